"""Writes one benchmark's table into BENCHMARKS.md, between markers, leaving other sections alone."""

import datetime
import platform
from pathlib import Path
from typing import List, Sequence

import torch

from picogpt_lightning.checkpoints import write_atomically

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def markdown_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def write_section(name: str, title: str, body: str) -> None:
    """Replaces (or appends) the section `name` of BENCHMARKS.md and prints it."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    # atomically: an interrupted benchmark never leaves half a BENCHMARKS.md
    write_atomically(str(BENCHMARKS_MD), lambda file: file.write(text.encode()))
    print(section)
