"""Checking a JSONL file of examples before `datasets` reads it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.textfiles import read_text


def check_jsonl(path: str, formats: Sequence[Sequence[str]]) -> None:
    """One-line errors for the usual mistakes, before `datasets` turns them into long tracebacks.

    `formats`: the column sets an example may have (trl's: prompt/completion, or messages); each column
    holds text or, conversational, a list of messages; every line keeps the first line's format."""
    columns = " or ".join(str(list(columns)) for columns in formats)
    if not os.path.isfile(path):
        raise InputNotFound(f"data file not found: {path}; check the path")
    text = read_text(path, "data file")
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path} is empty; write one JSON object per line with the keys {columns}")
    first = None  # the first line's format
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} holds a {type(record).__name__}, not a JSON object")
        shape = line_format(record, formats)
        if shape is None:
            missing = [column for column in formats[0] if not isinstance(record.get(column), (str, list))]
            raise UserError(
                f"{path} line {number} lacks the text column(s) {missing or list(formats[0])}; every line needs "
                f"{columns}, each text or a list of {{role, content}} messages"
            )
        first = first or shape
        if shape != first:
            raise UserError(f"{path} line {number} is written as {shape} while line {lines[0][0]} is {first}; use one format")


def line_format(record: dict, formats: Sequence[Sequence[str]]):
    """The (columns, conversational?) an example is written in, or None if it matches no format."""
    for columns in formats:
        values = [record.get(column) for column in columns]
        if all(isinstance(value, str) for value in values):
            return (list(columns), "text")
        if all(isinstance(value, list) and all(isinstance(m, dict) for m in value) for value in values):
            return (list(columns), "messages")
    return None
