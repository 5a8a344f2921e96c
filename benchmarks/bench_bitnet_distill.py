"""BitNet students distilled from the full-precision pretrain_cpu model, as BitNet Distillation does it.

    python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml
    python -m benchmarks.bench_bitnet_distill --teacher runs/pretrain_cpu/version_0/checkpoints/best.ckpt

Runs configs/bitnet_distill.yaml through the CLI once per student (BitNet b1.58, then 1-bit): SubLN,
the teacher's own weights as the start (init_from), logit KD plus the last block's attention
relations, pretrain_cpu's data, batch and steps. Scores every model on pretrain_cpu's 2400
validation windows (next-token cross-entropy of the final weights), packs the b1.58 student with
`quantize --method bitnet` and times its greedy decoding through bench_quant's compiled static-cache
path against the fp32 teacher's fastest path, in alternating rounds. Target: the b1.58 student within
0.03 nats/token of the fp32 model.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_quant import PROMPT_TOKENS, paired_speedups, time_decoding
from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.pipeline import val_loss
from picogpt_lightning.commands.quantize import quantize_checkpoint
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.data.source import find_corpus
from picogpt_lightning.lightning_cli import run_lightning

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "bitnet_distill.yaml"
STUDENTS = {"bitnet1.58": "BitNet b1.58", "bitnet1": "BitNet 1-bit"}
TARGET = 0.03  # nats/token above the fp32 model
# BitNet trained alone with pretrain_cpu's recipe for 800 steps, against fp32 at the same steps: val loss
# 1.9287 (b1.58) and 1.9480 (1-bit) vs 1.8378 (BENCHMARKS.md's Quantization section of commit ab024c0)
ALONE = {"bitnet1.58": 0.091, "bitnet1": 0.110}
LOGGED_PARTS = ("kd", "attn", "ce")
OVERRIDES = ("steps", "learning_rate", "min_lr", "alpha_ce", "alpha_kd", "alpha_attn")  # of the recipe's values


def distil(teacher: str, linear: str, work: Path, args) -> dict:
    """One fit of the recipe; the student's final weights saved as a checkpoint, its logged loss parts, its time."""
    flags = [
        "fit", "--config", str(RECIPE),
        "--model.init_args.teacher", teacher, "--model.init_args.init_from", teacher,
        "--data.init_args.tokenizer", teacher, "--data.init_args.data_path", str(find_corpus(None)),
        "--model.init_args.config.linear", linear,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(work / "runs"),
        "--checkpoint.dirpath", str(work / linear),
    ]
    for name in OVERRIDES[1:]:
        if getattr(args, name) is not None:
            flags += [f"--model.init_args.{name}", str(getattr(args, name))]
    if args.steps is not None:
        flags += ["--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(min(500, args.steps))]
    began = time.perf_counter()
    cli = run_lightning(flags)
    seconds = time.perf_counter() - began
    path = str(work / f"{linear}-final.pt")
    checkpoints.save(path, cli.model.model, cli.model.tokenizer, global_step=cli.trainer.global_step)
    metrics = cli.trainer.callback_metrics
    parts = {name: float(metrics[f"train/{name}"]) for name in LOGGED_PARTS if f"train/{name}" in metrics}
    return dict(path=path, seconds=seconds, steps=cli.trainer.global_step, parts=parts, hparams=dict(cli.model.hparams))


def decode_speed(teacher: PicoGPT, packed: PicoGPT, repeats: int) -> dict:
    """{name: (tokens/s, median ratio to fp32)} at batch 1, through bench_quant's timing."""
    new_tokens = teacher.config.block_size - PROMPT_TOKENS
    times = time_decoding({"fp32": teacher, "packed": packed}, 1, new_tokens, repeats)
    return dict(paired_speedups(times, 1, new_tokens), new_tokens=new_tokens)


def measure(args, publish) -> dict:
    """Every model's val loss, the b1.58 student's decoding speed; `publish(results)` after each student,
    so a section is written even if a later student's run is cut short."""
    teacher_checkpoint = checkpoints.load(args.teacher)
    teacher = PicoGPT.from_checkpoint(teacher_checkpoint).eval()
    windows = TinyShakespeareDataModule(**teacher_checkpoint.datamodule_hparams)  # pretrain_cpu's own val windows
    results = dict(teacher=val_loss(teacher, windows), teacher_steps=teacher_checkpoint.global_step, students={})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for linear in args.students:
            run = distil(args.teacher, linear, work, args)
            student = PicoGPT.from_checkpoint(run["path"]).eval()
            packed_path = str(work / f"{linear}-packed.pt")
            quantize_checkpoint(run["path"], packed_path, "bitnet")
            packed = PicoGPT.from_checkpoint(packed_path).eval()
            run.update(val=val_loss(student, windows), packed_val=val_loss(packed, windows),
                       packed_bytes=os.path.getsize(packed_path))
            if linear == "bitnet1.58":
                run["speed"] = decode_speed(teacher, packed, args.repeats)
                torch._dynamo.reset()
            results["students"][linear] = run
            print(f"{linear}: val {run['val']:.4f} (teacher {results['teacher']:.4f}) in {run['seconds']:.0f} s", flush=True)
            publish(results)
    return results


def report(results: dict, args, load: list) -> str:
    teacher = results["teacher"]
    rows = [["fp32 (pretrain_cpu, the teacher)", "-", results["teacher_steps"], f"{teacher:.4f}", "+0.0000", "-", "-"]]
    for linear, label in STUDENTS.items():
        rows.append([f"{label} alone (pretrain_cpu's recipe)", "-", 800, "-", f"+{ALONE[linear]:.3f} (cited)", "-", "-"])
    for linear, run in results["students"].items():
        parts = ", ".join(f"{name} {value:.4f}" for name, value in run["parts"].items())
        rows.append([
            f"{STUDENTS[linear]} distilled", parts, run["steps"], f"{run['val']:.4f}", f"{run['val'] - teacher:+.4f}",
            f"{run['packed_val']:.4f}", f"{run['seconds']:.0f} s",
        ])
    table = markdown_table(
        ["model", "last logged train losses", "steps", "val loss", "vs fp32", "val loss, packed file", "fit time"], rows
    )
    lines = []
    main = results["students"].get("bitnet1.58")
    if main is not None:
        gap = main["val"] - teacher
        lines.append(f"- BitNet b1.58 distilled: {gap:+.4f} nats/token vs fp32 "
                     f"({'met' if gap <= TARGET else 'NOT met'}, target <= +{TARGET}; alone: +{ALONE['bitnet1.58']})")
        speed = main["speed"]
        lines.append(f"- decoding, batch 1, {speed['new_tokens']} new tokens after {PROMPT_TOKENS}: packed b1.58 "
                     f"{speed['packed'][0]:.0f} tokens/s, fp32 {speed['fp32'][0]:.0f} tokens/s "
                     f"(**{speed['packed'][1]:.2f}x**, median of {args.repeats} paired rounds); packed file "
                     f"{main['packed_bytes'] / 1e6:.2f} MB")
    hp = next(iter(results["students"].values()))["hparams"] if results["students"] else {}
    settings = ", ".join(f"{name} {hp.get(name)}" for name in (
        "learning_rate", "min_lr", "warmup_steps", "alpha_ce", "alpha_kd", "alpha_attn", "temperature"))
    overrides = "".join(f" --{name} {getattr(args, name)}" for name in OVERRIDES if getattr(args, name) is not None)
    return f"""`python -m benchmarks.bench_bitnet_distill --teacher best.ckpt{overrides}` on {machine_description()}.
Load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f} (2 shared cores).

configs/bitnet_distill.yaml (BitNet Distillation, arXiv 2510.13998): the student has pretrain_cpu's shape
(4 layers x 128, block 64, char tokenizer) with BitLinear projections and SubLN (sub_norm: an RMSNorm before
attention's output projection and the MLP's down projection); it starts from the fp32 pretrain_cpu checkpoint's
weights (init_from) and learns from that checkpoint as teacher: logit KD plus MiniLM-v2 Q-Q/K-K/V-V attention
relations of the last block of each (4 relation heads), batch 12, pretrain_cpu's data. Settings: {settings}.
Val loss: next-token cross-entropy of the final weights over pretrain_cpu's 2400 validation windows; the packed
column is the same student written by `quantize --method bitnet` and read back (int8 kernel). The "alone" rows are
cited, not rerun: BitNet trained from scratch with configs/bitnet.yaml (pretrain_cpu's recipe) for 800 steps,
against fp32 trained as long (val loss 1.9287 and 1.9480 vs 1.8378: BENCHMARKS.md's Quantization section of
commit ab024c0, also README's recipe table).

{table}

{chr(10).join(lines)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the fp32 pretrain_cpu checkpoint (.ckpt)")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    for name in OVERRIDES[1:]:
        parser.add_argument(f"--{name}", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--note", default="", help="a line for the section, e.g. the settings tried before")
    parser.add_argument("--no_write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_load = os.getloadavg()[0]

    def publish(results: dict) -> None:
        body = report(results, args, [start_load, os.getloadavg()[0]]) + (f"\n{args.note}\n" if args.note else "")
        if args.no_write:
            print(body)
        else:
            write_section("bitnet_distill", "BitNet distillation: b1.58 and 1-bit students of the fp32 CPU model", body)

    measure(args, publish)


if __name__ == "__main__":
    main()
