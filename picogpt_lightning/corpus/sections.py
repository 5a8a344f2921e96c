"""Where a corpus is cut: documents into sections a tokenizer encodes alone, sections into train and validation.

A section is at most about SECTION_CHARS characters. A longer document is cut just after a
newline that has a non-space character on both sides ("word\\nWord"): there, byte-level BPE
(GPT-2's pre-tokenizer regex) and a character vocabulary split the text anyway, so encoding the
sections one by one gives exactly the ids of encoding the whole. (A tokenizer that adds a prefix
space at the start of a text, as SentencePiece-style ones do, adds one per section.)

The split takes whole sections, spread evenly through the corpus: section j goes to validation
when floor((j + 1) * f) > floor(j * f), so every 1/f-th section does and the fraction is f
whatever the order of the sources. A short document is one section, so the split is by
documents; a long one (a single-file corpus) contributes its sections.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

SECTION_CHARS = 1 << 16


def sections(blocks: Iterable[str], size: int = SECTION_CHARS) -> Iterator[tuple[str, bool]]:
    """(section, is the document's last) for a document given as blocks of text."""
    pending = ""
    for block in blocks:
        pending += block
        while len(pending) > size:
            cut = safe_cut(pending, size)
            yield pending[:cut], False
            pending = pending[cut:]
    yield pending, True


def safe_cut(text: str, size: int) -> int:
    """The last cut in text[size // 2 : size] just after a newline with non-space text on both sides; else `size`."""
    position = text.rfind("\n", size // 2, size - 1)
    while position > 0:
        if not text[position - 1].isspace() and not text[position + 1].isspace():
            return position + 1
        position = text.rfind("\n", size // 2, position)
    return size  # one very long line: cut inside it, where tokenization may differ by a token


def in_validation(index: int, val_fraction: float) -> bool:
    """Whether section `index` (counted over the whole corpus) is a validation section."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)
