"""A tiny FSDP2 run on 2 CPU processes (gloo) with gradient clipping, for tests/test_fsdp.py.

    python tests/fsdp_run.py --corpus input.txt --out DIR --clip 0.05

Trains with configs/fsdp.yaml's strategy (ModelParallelStrategy: the module shards itself with
fully_shard, one unit per Block; the checkpoint is one full file) and writes the losses of every
step and the checkpoint; with `--lora_base CKPT` it trains QLoRA adapters on that checkpoint. Lightning starts rank 1 by running this same command line again, which
is why the sharded run happens here and not inside pytest's process.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from ddp_run import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip", type=float, required=True)
    parser.add_argument("--lora_base", default=None, help="train QLoRA adapters on this checkpoint instead")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    losses, _, trainer = train(
        args.corpus, devices=2, batch_size=4, strategy=strategy, gradient_clip_val=args.clip, lora_base=args.lora_base
    )
    out = Path(args.out)
    trainer.save_checkpoint(out / "fsdp.ckpt")  # a collective: every rank takes part, rank 0 writes
    if trainer.is_global_zero:
        trained = next(p for p in trainer.lightning_module.model.parameters() if p.requires_grad)
        sharded = type(trained).__name__
        record = {"losses": losses, "world_size": trainer.world_size, "weights": sharded}
        (out / "run.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()  # without it gloo may abort the process at exit


if __name__ == "__main__":
    main()
