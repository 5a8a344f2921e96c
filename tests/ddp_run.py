"""Tiny training runs for the DDP test: per-step losses and final weights, on one process or two.

    python tests/ddp_run.py --corpus input.txt --out DIR

runs Lightning's `ddp` strategy with 2 CPU processes (gloo) twice: per-device batch 4, and
per-device batch 2 with 2 accumulated micro-batches. Lightning starts rank 1 by running this
same command line again, which is why DDP runs here and not inside pytest's process. The test
compares both with `train(devices=1, batch_size=8)`: one process, the same global batches.

With `--teacher PATH` it also takes one plain SGD step per module (LM, distillation) over
four micro-batches of different real-token counts, two per rank with accumulation 2, and
saves the weights: token weighting must make that the step over all four as one batch.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from picogpt_lightning.data import PadCollator
from picogpt_lightning.lora import LoraSettings
from picogpt_lightning.modules import LanguageModelModule
from tiny_training import (
    SEED, LossRecorder, SGDLanguageModel, collate, distillation_module, one_sgd_step, quiet_trainer,
    seed_everything, tiny_config, tiny_datamodule, uneven_sequences,
)

STEPS = 5
UNEVEN_RUNS = ("lm", "distill")
DDP_RUNS = {"batch4": dict(batch_size=4, accumulate=1), "batch2_accumulate2": dict(batch_size=2, accumulate=2)}


def reference_loader(datamodule, batch_size: int) -> DataLoader:
    """The data module's samples in the order Lightning's DistributedSampler (same seed) gives them, unsharded."""
    datamodule.setup("fit")
    dataset = datamodule.train_dataset
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=PadCollator(datamodule.pad_token_id))


def train(corpus, devices: int, batch_size: int, accumulate: int = 1, strategy="ddp", gradient_clip_val=1.0, lora_base=None):
    """Returns (loss of each global batch, final weights); in DDP, Lightning shards the data module itself.

    `lora_base`: a checkpoint on which QLoRA adapters train (NF4 base) instead of a fresh model."""
    seed_everything()
    if lora_base is None:
        model = LanguageModelModule(tiny_config(), warmup_steps=2, lr_decay_steps=STEPS)
    else:
        lora = LoraSettings(r=4, alpha=8, dropout=0.0, base="nf4")
        model = LanguageModelModule(init_from=lora_base, lora=lora, learning_rate=1e-2, warmup_steps=2, lr_decay_steps=STEPS)
    datamodule = tiny_datamodule(corpus, batch_size)
    recorder = LossRecorder()
    trainer = quiet_trainer(
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=gradient_clip_val,
        callbacks=[recorder],
    )
    if devices > 1:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, train_dataloaders=reference_loader(datamodule, batch_size))
    return recorder.losses, model.model.state_dict(), trainer


def uneven_module(kind: str, teacher: str):
    if kind == "lm":
        seed_everything()
        return SGDLanguageModel(tiny_config())
    return distillation_module(teacher)


def uneven_step_on_two_ranks(kind: str, teacher: str):
    """Rank 0 accumulates micro-batches 0 and 2, rank 1 micro-batches 1 and 3."""
    batches = [collate(sequences) for sequences in uneven_sequences()]
    module = uneven_module(kind, teacher)
    trainer = one_sgd_step(module, [batches[0::2], batches[1::2]], accumulate=2, devices=2)
    return module, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores

    if args.teacher:
        for kind in UNEVEN_RUNS:
            module, trainer = uneven_step_on_two_ranks(kind, args.teacher)
            if trainer.is_global_zero:
                out = Path(args.out) / f"uneven_{kind}"
                out.mkdir(parents=True, exist_ok=True)
                weights = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
                torch.save(weights, out / "weights.pt")

    for name, options in DDP_RUNS.items():
        losses, weights, trainer = train(args.corpus, devices=2, **options)
        if trainer.is_global_zero:
            out = Path(args.out) / name
            out.mkdir(parents=True, exist_ok=True)
            (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": trainer.world_size}))
            torch.save(weights, out / "weights.pt")
    if dist.is_initialized():
        dist.destroy_process_group()  # without it gloo may abort the process at exit


if __name__ == "__main__":
    main()
