"""Merging two fine-tunes of one pretrained model: slerp against linear interpolation.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_merge
    python -m benchmarks.bench_merge --pretrained runs/pretrain_cpu/version_0/checkpoints/last.ckpt --steps 300

Splits tiny_shakespeare into its first and second half, fine-tunes the pretrained
checkpoint (configs/pretrain_cpu.yaml's model) on each half with the ordinary `fit`
command, each half keeping its last 10% as its own validation text, then merges the two
fine-tunes with the `merge` command's code at t = 0.25, 0.5 and 0.75, by slerp and by
linear interpolation, and scores every model on both validation texts. Fine-tunes
already in --work_dir are reused, so a rerun only merges and scores.
"""

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import checkpoints
from picogpt_lightning.data import TinyShakespeareDataModule, find_corpus
from picogpt_lightning.commands.merge import merge_checkpoints
from picogpt_lightning.model import PicoGPT
from picogpt_lightning.commands.pipeline import CONFIGS, stage_flags, val_loss
from picogpt_lightning.merge import lerp, slerp

PRETRAINED = "runs/pretrain_cpu/version_0/checkpoints/last.ckpt"
HALVES = ("a", "b")
MERGE_TS = (0.25, 0.5, 0.75)
METHODS = {"slerp": slerp, "linear": lerp}


def write_halves(work: Path) -> dict:
    text = find_corpus(None).read_text(encoding="utf-8")
    middle = len(text) // 2
    paths = {half: work / f"half_{half}.txt" for half in HALVES}
    paths["a"].write_text(text[:middle], encoding="utf-8")
    paths["b"].write_text(text[middle:], encoding="utf-8")
    return paths


def fine_tune(pretrained: str, data_path: Path, work: Path, half: str, steps: int, learning_rate: float) -> Path:
    """`fit --config configs/pretrain_cpu.yaml` from the pretrained weights, on one half of the corpus."""
    from picogpt_lightning.lightning_cli import run_lightning

    out = work / f"finetune_{half}" / "last.ckpt"
    if out.is_file():
        print(f"reusing {out}")
        return out
    args = ["fit", "--config", str(CONFIGS / "pretrain_cpu.yaml")]
    args += stage_flags(f"finetune_{half}", work, progress_bar=False)
    args += [
        "--model.init_args.init_from", pretrained,
        "--data.init_args.tokenizer", pretrained,  # the pretrained ids: half a lacks two of the corpus' symbols
        "--data.init_args.data_path", str(data_path),
        "--trainer.max_steps", str(steps),
        "--model.init_args.lr_decay_steps", str(steps),
        "--model.init_args.learning_rate", str(learning_rate),
        "--model.init_args.min_lr", f"{learning_rate / 10:g}",
        "--model.init_args.warmup_steps", str(steps // 10),
    ]
    print(f"\n==> python -m picogpt_lightning {' '.join(args)}\n", flush=True)
    run_lightning(args)
    return out


def angles(path_a: Path, path_b: Path) -> list:
    """The angle in degrees between the parents' copies of each tensor (tied ones counted once)."""
    a, b = checkpoints.load(path_a).state_dict, checkpoints.load(path_b).state_dict
    distinct = {tensor.data_ptr(): name for name, tensor in a.items()}.values()
    cosines = [torch.nn.functional.cosine_similarity(a[name].flatten(), b[name].flatten(), dim=0) for name in distinct]
    return sorted(math.degrees(math.acos(min(1.0, cos.item()))) for cos in cosines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=PRETRAINED)
    parser.add_argument("--work_dir", default="runs/bench_merge")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    halves = write_halves(work)
    parents = {half: fine_tune(args.pretrained, halves[half], work, half, args.steps, args.learning_rate) for half in HALVES}
    # each parent's validation text: the windows its own run validated on
    val_data = {half: TinyShakespeareDataModule(**checkpoints.load(parents[half]).datamodule_hparams) for half in HALVES}

    def score(path) -> dict:
        model = PicoGPT.from_checkpoint(path)
        return {half: val_loss(model, val_data[half]) for half in HALVES}

    pretrained, parent = score(args.pretrained), {half: score(parents[half]) for half in HALVES}
    merged = {}
    for method, interpolate in METHODS.items():
        for t in MERGE_TS:
            out = work / f"{method}_{t}.ckpt"
            merge_checkpoints(str(parents["a"]), str(parents["b"]), str(out), t, overwrite=True, interpolate=interpolate)
            merged[method, t] = score(out)
    wall = time.perf_counter() - start

    def cells(losses: dict) -> list:
        return [f"{losses[half]:.4f}" for half in HALVES]

    rows = [["pretrained", "", *cells(pretrained), "", ""]]
    rows.append(["fine-tune A (parent, t = 0)", "", *cells(parent["a"]), "", ""])
    for t in MERGE_TS:
        rows.append(["merge", t, *cells(merged["slerp", t]), *cells(merged["linear", t])])
    rows.append(["fine-tune B (parent, t = 1)", "", *cells(parent["b"]), "", ""])
    headers = ["model", "t", "slerp: val A", "slerp: val B", "linear: val A", "linear: val B"]
    # parents and the pretrained model are one model each: their losses sit under "slerp" and the linear cells stay empty

    mean = {half: (parent["a"][half] + parent["b"][half]) / 2 for half in HALVES}
    verdicts = [
        f"val {half.upper()}: slerp t = 0.5 scores {merged['slerp', 0.5][half]:.4f} against the parents' mean "
        f"{mean[half]:.4f} ({'at or below, target met' if merged['slerp', 0.5][half] <= mean[half] else 'above, target missed'})"
        for half in HALVES
    ]
    degrees = angles(parents["a"], parents["b"])
    fallback = math.degrees(math.acos(0.9995))  # slerp's dot_threshold: below this angle it interpolates linearly
    near_parallel = sum(angle < fallback for angle in degrees)
    body = (
        f"`python -m benchmarks.bench_merge --pretrained {args.pretrained} --steps {args.steps} "
        f"--learning_rate {args.learning_rate:g}` on "
        f"{machine_description()}, {wall / 60:.1f} min.\n\n"
        f"Pretrained model: `{args.pretrained}` (configs/pretrain_cpu.yaml, 4 layers x 128, char tokenizer). "
        "tiny_shakespeare is cut into its first half (A) and second half (B); each half keeps its last 10% as its "
        f"validation text, and one fine-tune of the pretrained model runs on the other 90% of each half "
        f"({args.steps} steps, batch 12 x 64, lr {args.learning_rate:g} -> {args.learning_rate / 10:g} cosine). "
        "Mean next-token loss on each validation text (2400 windows of 64 tokens, nats per character); the "
        "merges are `merge_checkpoints` (the `merge` command) of fine-tune A (t = 0) and fine-tune B (t = 1). "
        "The pretraining run trained on the first 90% of the corpus: the pretrained model (and through it both "
        "fine-tunes) had seen val A's text, though no fine-tune step did, and none had seen val B's.\n\n"
        + markdown_table(headers, rows)
        + "\n\n"
        + "\n".join(f"- {line}" for line in verdicts)
        + f"\n\nAngles between the parents' tensors: median {degrees[len(degrees) // 2]:.1f} degrees, largest "
        f"{degrees[-1]:.1f}; {near_parallel} of {len(degrees)} tensors are within {fallback:.1f} degrees "
        "(|cos| > 0.9995), where slerp falls back to linear interpolation. At small angles sin(x) ~ x, so "
        "slerp's weights differ from 1 - t and t only to second order in the angle."
    )
    write_section("merge", "Merging", body)


if __name__ == "__main__":
    main()
