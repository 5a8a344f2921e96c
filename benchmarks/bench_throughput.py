"""Tokens/s of Lightning's training path against a plain PyTorch loop, on the same everything.

    flock /tmp/picogpt_bench.lock python -m benchmarks.bench_throughput   (from the repository root)

Both sides train the model of configs/pretrain_cpu.yaml from the same initial weights on the
same pre-collated batches, with the module's own AdamW and warmup+cosine schedule and gradient
clipping at 1.0. The Lightning side runs Trainer.fit as the recipe does (TensorBoard logging
every 10 steps), without and with the default progress bar, which redraws every step; the
plain side is forward, loss, backward, clip, step. Rounds cycle through the three so load from
other processes falls on all alike; each round's first steps are left out of the timing
(allocator warm-up, Trainer start). Writes the "throughput_cpu" section of BENCHMARKS.md.
"""

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.model import PicoGPTConfig
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.modules.base import next_token_loss

CPU_RECIPE = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)  # configs/pretrain_cpu.yaml
BATCH_SIZE = 12
CLIP = 1.0


def collate_batches(count: int) -> list:
    datamodule = TinyShakespeareDataModule(block_size=64, batch_size=BATCH_SIZE, train_samples=count * BATCH_SIZE)
    datamodule.setup("fit")
    return list(datamodule.train_dataloader())


def fresh_module(initial_state: dict, steps: int) -> LanguageModelModule:
    module = LanguageModelModule(PicoGPTConfig(**CPU_RECIPE), lr_decay_steps=steps, betas=(0.9, 0.99))
    module.load_state_dict(initial_state)
    return module


class StepClock(L.Callback):
    """Seconds from the end of step `skip` to the end of the last step."""

    def __init__(self, skip: int):
        self.skip = skip
        self.start = self.end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_round(initial_state: dict, batches: list, skip: int, log_dir: str, progress_bar: bool) -> float:
    module = fresh_module(initial_state, len(batches))
    clock = StepClock(skip)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        gradient_clip_val=CLIP,
        log_every_n_steps=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="bench"),
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return clock.end - clock.start


def plain_round(initial_state: dict, batches: list, skip: int) -> float:
    module = fresh_module(initial_state, len(batches))
    optimizer, schedule = module.configure_optimizers().values()
    schedule = schedule["scheduler"]
    model = module.model.train()
    for step, batch in enumerate(DataLoader(batches, batch_size=None)):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = next_token_loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
        if step + 1 == skip:
            start = time.perf_counter()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="steps per round")
    parser.add_argument("--skip", type=int, default=10, help="untimed first steps of each round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side, alternating")
    args = parser.parse_args()

    torch.manual_seed(1337)
    initial_state = LanguageModelModule(PicoGPTConfig(**CPU_RECIPE)).state_dict()
    batches = collate_batches(args.steps)
    tokens_per_round = (args.steps - args.skip) * batches[0]["input_ids"].numel()
    paths = {
        "Lightning Trainer.fit": lambda log_dir: lightning_round(initial_state, batches, args.skip, log_dir, False),
        "plain PyTorch loop": lambda log_dir: plain_round(initial_state, batches, args.skip),
        "Lightning Trainer.fit + progress bar": lambda log_dir: lightning_round(
            initial_state, batches, args.skip, log_dir, True
        ),
    }
    rates = {name: [] for name in paths}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for name, run_round in paths.items():
                rates[name].append(tokens_per_round / run_round(log_dir))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    plain = medians["plain PyTorch loop"]
    rows = [
        [name, f"{medians[name]:,.0f}", f"{min(values):,.0f}-{max(values):,.0f}", f"{medians[name] / plain:.3f}"]
        for name, values in rates.items()
    ]
    body = (
        f"{machine_description()}. configs/pretrain_cpu.yaml's model and batch (4 layers, width 128, "
        f"block 64, batch 12), fp32, {args.rounds} rounds of {args.steps} steps per path, cycling "
        f"through the paths, the first {args.skip} steps of each round untimed; "
        "`flock /tmp/picogpt_bench.lock python -m benchmarks.bench_throughput`.\n\n"
        + markdown_table(["training path", "tokens/s (median)", "range over rounds", "vs plain"], rows)
        + f"\n\nLightning / plain: **{medians['Lightning Trainer.fit'] / plain:.3f}** (target >= 0.95)."
    )
    write_section("throughput_cpu", "CPU training throughput: Lightning vs a plain PyTorch loop", body)


if __name__ == "__main__":
    main()
