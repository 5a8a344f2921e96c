"""Where the corpus is cut: the train/validation split point and the speaker turns.

Both the language-model data and the derived prompt/completion pairs cut the text here, so a
speech lands in the same split for every recipe and validation text never trains.
"""

from __future__ import annotations

import re

SPEECH_BREAK = re.compile(r"\n\n+")  # the corpus separates speaker turns with blank lines


def split_point(text: str, val_fraction: float) -> int:
    """Index of the first validation character: the first (1 - val_fraction) of the text trains, like nanoGPT."""
    return int(len(text) * (1 - val_fraction))


def speech_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each speaker turn; a turn keeps its trailing blank line, so the spans tile the text."""
    starts = [0] + [match.end() for match in SPEECH_BREAK.finditer(text)]
    starts = [start for start in starts if start < len(text)]
    return list(zip(starts, starts[1:] + [len(text)]))
