"""The notebooks run top to bottom (with small step counts) and reach their own checks."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_fine_tuning_notebook_runs(tmp_path, monkeypatch, corpus_path):
    monkeypatch.setenv("PICOGPT_DATA", str(corpus_path))
    monkeypatch.setenv("NOTEBOOK_PRETRAIN_STEPS", "40")
    monkeypatch.setenv("NOTEBOOK_FINETUNE_STEPS", "10")
    notebook = nbformat.read(NOTEBOOKS / "fine_tuning.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "val/loss on speeches:" in outputs
    assert "identical greedy output:" in outputs  # the notebook's own assert against transformers passed
    assert (tmp_path / "notebook_runs" / "base.ckpt").is_file()


def test_journey_notebook_runs_every_stage_with_its_figure_and_numbers(tmp_path, monkeypatch, corpus_path):
    import base64
    import math
    import re

    monkeypatch.setenv("PICOGPT_DATA", str(corpus_path))
    monkeypatch.setenv("NOTEBOOK_STEPS", "8")
    monkeypatch.setenv("NOTEBOOK_TENSORBOARD", "0")  # no TensorBoard server in a test
    my_text = tmp_path / "my_text.txt"
    my_text.write_text(corpus_path.read_text(encoding="utf-8")[200_000:230_000], encoding="utf-8")
    monkeypatch.setenv("NOTEBOOK_MY_TEXT", str(my_text))
    notebook = nbformat.read(NOTEBOOKS / "journey.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    images = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    # a figure per stage: pretrain, your text, SFT, DPO, NF4, BitNet and merge curves, then the bar chart
    assert len(images) == 8
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    stages = ["pretrain", "my_text", "sft", "dpo", "nf4", "bitnet1.58", "my_text_seed2", "slerp"]
    for stage in stages:
        match = re.search(rf"^{re.escape(stage)}: val loss on your text (\d+\.\d+)$", text, re.MULTILINE)
        assert match and math.isfinite(float(match.group(1))) and float(match.group(1)) < 5.0, stage
    table = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split()[:1] and line.split()[0] in stages and len(line.split()) == 2}
    assert list(table) == stages
    assert "held-out reward accuracy" in text and "in NF4" in text
    assert "Warning" not in text  # nothing a user cannot act on
