"""Sources as documents: text files, folders, globs, JSONL/Parquet/CSV and `datasets` folders, read as a stream.

A text file is one document; a record of a JSONL, Parquet or CSV file, or of a folder written by
`datasets`' `save_to_disk`, is one document (its `text_field`). Tabular files are read through
`datasets` in streaming mode, so no source is ever held in memory whole. Whatever is not text
(NUL bytes, invalid UTF-8), an empty source and a missing field stop the read in one line naming
the source.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from picogpt_lightning.errors import InputNotFound, UserError, first_line

TABULAR_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")  # what save_to_disk writes
READ_BYTES = 1 << 20
RECORDS_PER_READ = 1024


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text", "json", "parquet", "csv" or "saved" (a save_to_disk folder)

    def files(self) -> list[Path]:
        if self.kind != "saved":
            return [self.path]
        return sorted(path for path in self.path.rglob("*") if path.is_file())

    def describe(self) -> dict:
        """What the manifest records of it: path, kind, bytes and sha256 of its files."""
        digest, size = hashlib.sha256(), 0
        for path in self.files():
            with open(path, "rb") as file:
                while block := file.read(READ_BYTES):
                    digest.update(block)
                    size += len(block)
        return {"path": str(self.path), "kind": self.kind, "bytes": size, "sha256": digest.hexdigest()}


def resolve_sources(names: list[str]) -> list[Source]:
    """Each name as a file, a folder (recursively, hidden entries skipped) or a glob, in a sorted, stable order."""
    if isinstance(names, (str, os.PathLike)):
        names = [names]
    if not names:
        raise UserError("no --source given; name text files, folders, globs, JSONL/Parquet/CSV files or datasets folders")
    sources: list[Source] = []
    for name in map(str, names):
        path = Path(name).expanduser()
        if path.is_file():
            sources.append(_file_source(path))
        elif path.is_dir():
            sources += _folder_sources(path)
        elif glob.has_magic(name):
            matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(name), recursive=True))
            files = [match for match in matches if match.is_file() and not _hidden(match)]
            if not files:
                raise InputNotFound(f"source {name} matches no file; check the pattern (quote it so the shell leaves it)")
            sources += [_file_source(match) for match in files]
        else:
            raise InputNotFound(f"source {name} does not exist; name a text file, a folder or a glob")
    return sources


def _file_source(path: Path) -> Source:
    return Source(path, TABULAR_FORMATS.get(path.suffix.lower(), "text"))


def _folder_sources(folder: Path) -> list[Source]:
    if any((folder / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return [Source(folder, "saved")]
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not _hidden(path.relative_to(folder)))
    if not files:
        raise UserError(f"source folder {folder} holds no file; point at a folder of text files")
    return [_file_source(path) for path in files]


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def documents(source: Source, text_field: str = "text") -> Iterator[Iterator[str]]:
    """The source's documents, each an iterator over its text in blocks (a text file is read 1 MiB at a time)."""
    found = False
    if source.kind == "text":
        documents_read = [_text_file(source.path)]
    else:
        documents_read = _records(source, text_field)
    for document in documents_read:
        for block in document:
            if not block:
                continue
            if "\x00" in block:
                raise UserError(f"source {source.path} holds NUL bytes: it is not a text file; leave it out of --source")
            found = True
            yield _chain(block, document)
            break
    if not found:
        raise UserError(f"source {source.path} holds no text; fill it or leave it out of --source")


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _text_file(path: Path) -> Iterator[str]:
    """The file's text in blocks of about 1 MiB, decoded as UTF-8; invalid bytes are one line with the line number."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(path, "rb") as file:
        while True:
            raw = file.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                line = lines + raw.count(b"\n", 0, max(0, error.start)) + 1
                raise UserError(
                    f"source {path} line {line} is not UTF-8 text ({error.reason}); save it as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8) or leave it out of --source"
                ) from None
            if "\x00" in text:
                line = lines + text[: text.index("\x00")].count("\n") + 1
                raise UserError(f"source {path} line {line} holds NUL bytes: it is not a text file; leave it out of --source")
            lines += text.count("\n")
            yield text
            if not raw:
                return


def _records(source: Source, text_field: str) -> Iterator[Iterator[str]]:
    """One single-block document per record's `text_field`, read through `datasets` a batch at a time."""
    dataset = _open_dataset(source)
    number = 0
    try:
        for batch in dataset.iter(batch_size=RECORDS_PER_READ):
            if text_field not in batch:
                raise UserError(
                    f"source {source.path} has no field {text_field!r} (it has {', '.join(map(repr, batch))}); "
                    "pass --text_field with one of them"
                )
            for text in batch[text_field]:
                number += 1
                if text is not None and not isinstance(text, str):
                    raise UserError(
                        f"source {source.path} record {number}: field {text_field!r} holds {type(text).__name__}, "
                        "not text; pass --text_field naming a text column"
                    )
                yield iter([text or ""])
    except UserError:
        raise
    except Exception as error:  # a malformed line or file, as pyarrow or datasets words it
        raise UserError(f"source {source.path} cannot be read as {source.kind}: {first_line(error)}") from None


def _open_dataset(source: Source):
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.kind == "saved":
            dataset = datasets.load_from_disk(str(source.path))
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise UserError(f"source {source.path} has splits {list(dataset)} and no 'train'; save the one to use")
                dataset = dataset["train"]
            return dataset
        # streaming: records are read as they are used, never copied into an Arrow cache
        return datasets.load_dataset(source.kind, data_files=[str(source.path)], split="train", streaming=True)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"source {source.path} cannot be read as {source.kind}: {first_line(error)}") from None
