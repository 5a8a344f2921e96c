"""Lightning's checkpoints and LightningCLI's config.yaml, written atomically.

Lightning's own TorchCheckpointIO writes through fsspec, whose local "transaction" stages the
file in $TMPDIR and then moves it into place: across filesystems that move is a plain copy, so
a SIGKILL or a full disk during it leaves a truncated `last.ckpt` where the good one was.
`AtomicCheckpointIO` writes through `checkpoints.write_atomically` instead: a temporary file in
the checkpoint's own directory, fsynced, then renamed over it, so the previous checkpoint stays
until the new one is whole, and a failed write ends the run with one line naming the path.
"""

import os
from typing import Any, Optional

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from picogpt_lightning import checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic: `path` holds the previous checkpoint or the new one.

    Every recipe's Trainer gets one (`with_atomic_checkpoint_io`); remote paths (s3://, gs://)
    keep Lightning's way, their stores having no rename to make atomic.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        # streamed into the file, not first into memory as Lightning does: no second copy of the state
        checkpoints.write_atomically(os.fspath(path), lambda file: torch.save(checkpoint, file))


def with_atomic_checkpoint_io(plugins) -> list:
    """The Trainer's `plugins` with an AtomicCheckpointIO added, unless they already name a CheckpointIO.

    Lightning accepts one CheckpointIO among its plugins; the user's own choice is kept.
    """
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class AtomicSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's SaveConfigCallback whose `config.yaml` is written atomically: whole or absent."""

    def __init__(self, parser, config, *args, **kwargs):
        super().__init__(AtomicSavingParser(parser), config, *args, **kwargs)


class AtomicSavingParser:
    """The parser as SaveConfigCallback uses it, but `save` writes one file through `write_atomically`.

    A config saved as several files (`multifile=True` with linked sub-configs) keeps jsonargparse's way.
    """

    def __init__(self, parser):
        self.parser = parser

    def __getattr__(self, name: str):
        return getattr(self.parser, name)

    def save(self, config, path, skip_none: bool = True, overwrite: bool = False, multifile: bool = False, **kwargs):
        if multifile or kwargs:
            return self.parser.save(config, path, skip_none=skip_none, overwrite=overwrite, multifile=multifile, **kwargs)
        if not overwrite and os.path.isfile(path):
            raise ValueError(f"Refusing to overwrite existing file: {path}")
        text = self.parser.dump(config, skip_unset=skip_none)
        checkpoints.write_atomically(os.fspath(path), lambda file: file.write(text.encode("utf-8")))
