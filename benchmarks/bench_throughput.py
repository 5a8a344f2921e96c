"""Tokens/s of Lightning's training path, eager and compiled, against a plain compiled PyTorch loop.

    flock /tmp/picogpt_bench.lock python -m benchmarks.bench_throughput   (from the repository root)

On a GPU: configs/pretrain.yaml's model and batch (6 layers, width 384, block 256, batch 64) in
bf16-mixed; writes the "throughput_gpu" section of BENCHMARKS.md with tokens/s, ms/step and MFU
(dense bf16 peak, callbacks.dense_peak_flops). On a CPU: a model so small that per-step overhead
dominates (2 layers, width 64, block 64, batch 8) in fp32; writes "throughput_cpu".

Every path trains the same initial weights on the same pre-collated batches with the module's
own fused AdamW, warmup+cosine schedule and norm clipping at 1.0. Lightning runs Trainer.fit as
a recipe does (TensorBoard logging every 10 steps, no progress bar), with `compile` off and on;
the plain loops are forward, loss, backward, clip, step, with the model and loss compiled or
not. Rounds cycle through the paths so load from other processes falls on all alike; each
round's first steps (compilation, allocator warm-up, Trainer start) are left out of the timing.
On a CPU the clock is the process's CPU time (one thread), so other work on shared cores does
not count against whichever path it happens to overlap.
"""

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.callbacks import dense_peak_flops
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.model import PicoGPTConfig
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.modules.base import flops_per_token, next_token_loss

SETTINGS = {  # model, batch and precision per device type
    "cuda": dict(model=dict(block_size=256, n_layer=6, n_head=6, n_embd=384), batch_size=64, precision="bf16-mixed"),
    "cpu": dict(model=dict(block_size=64, n_layer=2, n_head=4, n_embd=64), batch_size=8, precision="32-true"),
}
CLIP = 1.0


def collate_batches(count: int, block_size: int, batch_size: int) -> list:
    datamodule = TinyShakespeareDataModule(
        block_size=block_size, batch_size=batch_size, train_samples=count * batch_size
    )
    datamodule.setup("fit")
    return list(datamodule.train_dataloader())


def fresh_module(config: PicoGPTConfig, initial_state: dict, steps: int, compile: bool) -> LanguageModelModule:
    torch._dynamo.reset()  # every compiled round compiles afresh (inductor's cache makes repeats quick)
    module = LanguageModelModule(config, lr_decay_steps=steps, betas=(0.9, 0.99), compile=compile)
    module.load_state_dict(initial_state)
    return module


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """Wall time on a GPU; on a CPU this process's own CPU time, which other processes sharing the
    cores do not inflate (one thread, data loading in-process, so it is all the step's work)."""
    return time.perf_counter() if device == "cuda" else time.process_time()


class StepClock(L.Callback):
    """Seconds from the end of step `skip` to the end of the last step."""

    def __init__(self, skip: int, last: int, device: str):
        self.skip, self.last, self.device = skip, last, device
        self.start = self.end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 in (self.skip, self.last):
            synchronize(self.device)
            if batch_idx + 1 == self.skip:
                self.start = clock(self.device)
            else:
                self.end = clock(self.device)


def lightning_round(setting, config, initial_state, batches, skip, log_dir, device, compile) -> float:
    module = fresh_module(config, initial_state, len(batches), compile)
    clock = StepClock(skip, len(batches), device)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=setting["precision"],
        max_steps=len(batches),
        gradient_clip_val=CLIP,
        log_every_n_steps=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="bench"),
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, pin_memory=device == "cuda"))
    return clock.end - clock.start


def plain_round(setting, config, initial_state, batches, skip, device, compile) -> float:
    module = fresh_module(config, initial_state, len(batches), compile=False)
    model = module.model.to(device).train()
    optimizer, schedule = module.configure_optimizers().values()  # fused AdamW: clipping is ours here
    schedule = schedule["scheduler"]

    def losses(input_ids, labels):
        return next_token_loss(model(input_ids).logits, labels)

    step_loss = torch.compile(losses) if compile else losses
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=setting["precision"] == "bf16-mixed")
    for step, batch in enumerate(DataLoader(batches, batch_size=None, pin_memory=device == "cuda")):
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast:
            loss = step_loss(input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step + 1 == skip:
            synchronize(device)
            start = clock(device)
    synchronize(device)
    return clock(device) - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="steps per round")
    parser.add_argument("--skip", type=int, default=20, help="untimed first steps of each round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path, cycling through the paths")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # the clock counts this process's CPU time: one thread keeps it the step's
    setting = SETTINGS[device]
    config = PicoGPTConfig(**setting["model"], dropout=0.0)
    torch.manual_seed(1337)
    initial_state = LanguageModelModule(config).state_dict()
    batches = collate_batches(args.steps, config.block_size, setting["batch_size"])
    tokens_per_step = batches[0]["input_ids"].numel()
    timed_steps = args.steps - args.skip
    common = (setting, config, initial_state, batches, args.skip)
    paths = {
        "Trainer.fit, eager": lambda log_dir: lightning_round(*common, log_dir, device, compile=False),
        "Trainer.fit, compile: true": lambda log_dir: lightning_round(*common, log_dir, device, compile=True),
        "plain loop, eager": lambda log_dir: plain_round(*common, device, compile=False),
        "plain loop, compiled": lambda log_dir: plain_round(*common, device, compile=True),
    }
    seconds = {name: [] for name in paths}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for name, run_round in paths.items():
                seconds[name].append(run_round(log_dir))

    peak = dense_peak_flops(torch.cuda.get_device_name(0), torch.bfloat16) if device == "cuda" else None
    flops = flops_per_token(config, config.block_size)
    rates = {name: [timed_steps * tokens_per_step / s for s in values] for name, values in seconds.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    plain = medians["plain loop, compiled"]
    rows = []
    for name, values in rates.items():
        mfu = f"{100 * medians[name] * flops / peak:.1f}%" if peak else "-"
        ms_per_step = 1000 * tokens_per_step / medians[name]
        rows.append(
            [name, f"{medians[name]:,.0f}", f"{min(values):,.0f}-{max(values):,.0f}", f"{ms_per_step:.2f}", mfu,
             f"{medians[name] / plain:.3f}"]
        )  # fmt: skip
    size = setting["model"]
    body = (
        f"{machine_description()}, {setting['precision']}. Model and batch: {size['n_layer']} layers, width "
        f"{size['n_embd']}, block {size['block_size']}, batch {setting['batch_size']}; {args.rounds} rounds of "
        f"{args.steps} steps per path, cycling through the paths, the first {args.skip} steps of each round "
        f"untimed; medians over rounds{'' if device == 'cuda' else ', timed in process CPU time (one thread)'}. "
        "`flock /tmp/picogpt_bench.lock python -m benchmarks.bench_throughput`.\n\n"
        + markdown_table(["training path", "tokens/s", "range over rounds", "ms/step", "MFU", "vs plain compiled"], rows)
        + f"\n\nTrainer.fit compiled / plain compiled loop: **{medians['Trainer.fit, compile: true'] / plain:.3f}**; "
        f"Trainer.fit eager / plain eager loop: **{medians['Trainer.fit, eager'] / medians['plain loop, eager']:.3f}** "
        "(target >= 0.9)."
    )
    section = "throughput_gpu" if device == "cuda" else "throughput_cpu"
    title = "GPU" if device == "cuda" else "CPU"
    write_section(section, f"{title} training throughput: Lightning vs a plain PyTorch loop", body)


if __name__ == "__main__":
    main()
