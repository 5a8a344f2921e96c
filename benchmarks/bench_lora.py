"""Full fine-tune, LoRA and QLoRA side by side: the same checkpoint, data, seed and steps.

    python -m benchmarks.bench_lora --init_from runs/pretrain_cpu/version_0/checkpoints/best.ckpt [--steps 300]

Each run is configs/lora.yaml or configs/qlora.yaml through the CLI (the full fine-tune is
lora.yaml without `lora`, at the learning rates given with --full_lrs, the best one kept as the
reference). Reported: the final val loss on the speeches' validation part, trainable
parameters, and the peak training memory, measured on the live tensors at every optimizer
step: the model's parameters and buffers (QLoRA's packed NF4 codes and scales), the gradients
and the optimizer state. Targets: LoRA and QLoRA within 0.02 nats of the full fine-tune,
QLoRA's memory at most 0.35x the full fine-tune's.
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.lightning_cli import run_lightning

REPO_ROOT = Path(__file__).resolve().parent.parent
LOSS_GAP, MEMORY_RATIO = 0.02, 0.35


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def training_memory(module, trainer) -> int:
    """Parameters and buffers (a tied weight once), gradients and optimizer state, as they stand at an
    optimizer step: one more backward on a training batch after the run brings the gradients back."""
    batch = next(iter(trainer.datamodule.train_dataloader()))
    module.train()
    module.compute_losses(batch)[0]["loss"].backward()
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    state = [value for per_param in trainer.optimizers[0].state.values() for value in per_param.values()]
    total = tensor_bytes(unique.values()) + tensor_bytes(grads) + tensor_bytes(state)
    module.zero_grad(set_to_none=True)
    return total


def fine_tune(recipe: str, init_from: str, steps: int, lr: float, root: Path, smoke: bool, full: bool = False) -> dict:
    args = [
        "fit", "--config", str(REPO_ROOT / "configs" / f"{recipe}.yaml"),
        "--model.init_args.init_from", init_from,
        "--model.init_args.learning_rate", str(lr), "--model.init_args.min_lr", str(lr / 10),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.logger.init_args.name", f"{'full' if full else recipe}_{lr:g}",
    ]
    if full:
        args += ["--model.init_args.lora", "null"]
    if smoke:
        args += ["--data.init_args.val_samples", "32", "--trainer.limit_val_batches", "1"]
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        cli = run_lightning(args)
    seconds = time.perf_counter() - began
    module, trainer = cli.model, cli.trainer
    return {
        "val": float(trainer.callback_metrics["val/loss"]),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "memory": training_memory(module, trainer),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--init_from", required=True, help="a pretrain_cpu checkpoint (configs/pretrain_cpu.yaml)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--full_lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--lora_lr", type=float, default=6e-3)
    parser.add_argument("--smoke", action="store_true", help="a few steps and one validation batch: checks the script")
    args = parser.parse_args()
    steps = 3 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = {lr: fine_tune("lora", args.init_from, steps, lr, root, args.smoke, full=True) for lr in args.full_lrs}
        best_lr = min(full, key=lambda lr: full[lr]["val"])
        lora = fine_tune("lora", args.init_from, steps, args.lora_lr, root, args.smoke)
        qlora = fine_tune("qlora", args.init_from, steps, args.lora_lr, root, args.smoke)
    reference = full[best_lr]
    rows = [[f"full fine-tune, lr {lr:g}" + (" (reference)" if lr == best_lr else ""), *cells(run, reference)]
            for lr, run in full.items()]
    rows += [[f"LoRA r=8, lr {args.lora_lr:g}", *cells(lora, reference)], [f"QLoRA r=8 (NF4 base), lr {args.lora_lr:g}", *cells(qlora, reference)]]
    table = markdown_table(["run", "val loss", "vs full", "trainable params", "training memory", "vs full", "s"], rows)
    met = {
        "LoRA within 0.02 nats": lora["val"] - reference["val"] <= LOSS_GAP,
        "QLoRA within 0.02 nats": qlora["val"] - reference["val"] <= LOSS_GAP,
        "QLoRA memory <= 0.35x": qlora["memory"] <= MEMORY_RATIO * reference["memory"],
    }
    verdict = "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in met.items())
    text = (
        f"`python -m benchmarks.bench_lora --steps {steps}` on {machine_description()}: from the pretrain_cpu checkpoint "
        f"`{args.init_from}` (4 layers x 128, char tokenizer, block 64), fine-tuned on tiny_shakespeare's speeches "
        f"(configs/lora.yaml's data: one sample per speech, batch 32, seed 1337), {steps} steps each, the same data in the "
        "same order. LoRA/QLoRA: rank 8, alpha 16, dropout 0.05 on qkv, proj, gate_proj, up_proj, down_proj "
        "(configs/lora.yaml, configs/qlora.yaml). Val loss: the speeches' validation part at the end. Training memory: "
        "parameters and buffers (QLoRA's packed NF4 codes and scales; a tied weight once), gradients and AdamW state, "
        "measured on the live tensors at an optimizer step.\n\n"
        f"{table}\n\n{verdict}."
    )
    if args.smoke:
        print(text)
    else:
        write_section("lora", "Fine-tuning: full, LoRA and QLoRA (configs/lora.yaml, configs/qlora.yaml)", text)


def cells(run: dict, reference: dict) -> list:
    return [
        f"{run['val']:.4f}", f"{run['val'] - reference['val']:+.4f}", f"{run['trainable']:,}",
        f"{run['memory'] / 2**20:.2f} MiB", f"{run['memory'] / reference['memory']:.3f}x", f"{run['seconds']:.0f}",
    ]


if __name__ == "__main__":
    main()
