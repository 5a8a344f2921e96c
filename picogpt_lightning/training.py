"""Running LightningCLI: the one way every recipe trains, from the command line or the pipeline.

Kept apart from `cli.py` (the command-line entry point) and `pipeline.py` (which runs
several trainings), so both can call it without importing each other.
"""

import sys
import warnings
from typing import List
from unittest.mock import patch

# raised inside Lightning's own tree utilities on recent torch: nothing a user can act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def picogpt_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    class PicoGPTCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/loss",
                    "checkpoint.mode": "min",
                    "checkpoint.filename": "best",
                    "checkpoint.save_top_k": 1,
                    "checkpoint.save_last": True,
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            # the tokenizer decides the vocabulary: the model takes its size from the data
            parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size", apply_on="instantiate")

        def before_fit(self):
            from picogpt_lightning.checkpoints import require_training_state

            # Lightning would fail on a weights-only file with a KeyError deep in its migration code
            require_training_state(self.config[self.subcommand].get("ckpt_path"))

        before_validate = before_test = before_predict = before_fit

    return PicoGPTCLI


def run_lightning(args: List[str]):
    """Runs LightningCLI on `args` (e.g. ["fit", "--config", ...]) and returns it (.model, .trainer)."""
    import torch.distributed as dist
    from lightning import LightningDataModule

    from picogpt_lightning.modules import PicoGPTModule

    own_argv = args == sys.argv[1:]
    # LightningCLI warns when it is given arguments while the process has command-line arguments
    # of its own (the pipeline's): those are not for it, so it sees only the program name
    with patch.object(sys, "argv", sys.argv if own_argv else sys.argv[:1]):
        cli = picogpt_cli_class()(
            PicoGPTModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "picogpt"},
                }
            },
            args=None if own_argv else args,
        )
    # a `ddp` process group left alive until interpreter exit can abort the process there
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return cli
