"""Checking a JSONL file of examples before `datasets` reads it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.textfiles import read_text


def check_jsonl(path: str, columns: Sequence[str]) -> None:
    """One-line errors for the usual mistakes, before `datasets` turns them into long tracebacks."""
    if not os.path.isfile(path):
        raise InputNotFound(f"data file not found: {path}; check the path")
    text = read_text(path, "data file")
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path} is empty; write one JSON object per line with the keys {list(columns)}")
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} holds a {type(record).__name__}, not a JSON object")
        missing = [column for column in columns if not isinstance(record.get(column), str)]
        if missing:
            raise UserError(f"{path} line {number} lacks the text column(s) {missing}; every line needs {list(columns)}")
