"""Quantization: fp32 against NF4 on one trained model, and BitNet models trained with the same recipe.

    python -m picogpt_lightning fit --config configs/bitnet.yaml                                   # BitNet b1.58
    python -m picogpt_lightning fit --config configs/bitnet.yaml --model.init_args.config.linear bitnet1
    python -m benchmarks.bench_quant --fp32 FP32.ckpt \\
        --bitnet1.58 B158.ckpt --bitnet1 B1.ckpt [--fp32_baseline FP32_SAME_STEPS.ckpt]

The fp32 checkpoint is a configs/pretrain_cpu.yaml run; NF4 is that checkpoint through the
`quantize` command (block size 64, double quantization). The BitNet checkpoints are
configs/bitnet.yaml runs, pretrain_cpu's recipe with BitLinear projections, packed with
`quantize --method bitnet`; `--fp32_baseline` names the fp32 run they compare with when they
were trained for fewer steps than --fp32 (all three at the same count). "Linear weights" are
the projections inside the blocks (the only layers quantized): embeddings, norms and the tied
lm_head stay fp32 in every model.
Targets: NF4 linear weights <= 0.3x the fp32 bytes and val perplexity within +3%.
"""

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.commands.pipeline import val_loss
from picogpt_lightning.quant import NF4Linear, PackedBitLinear
from picogpt_lightning.commands.quantize import quantize_checkpoint

FP32_CKPT = "runs/pretrain_cpu/version_0/checkpoints/last.ckpt"  # from configs/pretrain_cpu.yaml
PROMPT_TOKENS = 8


def linear_weight_bytes(model: PicoGPT) -> int:
    """Bytes of the blocks' projections: full weights, or packed codes plus every scale they need."""
    total = 0
    for module in model.blocks.modules():
        if isinstance(module, (NF4Linear, PackedBitLinear)):
            total += sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def generation_tokens_per_second(models: dict, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding of one prompt with the KV cache; models take turns, median of `repeats` after a warm-up."""
    prompt = torch.randint(0, 65, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    for model in models.values():
        model.generate(prompt, max_new_tokens=new_tokens)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens)
            times[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", default=FP32_CKPT, help="a configs/pretrain_cpu.yaml checkpoint")
    parser.add_argument("--bitnet1.58", dest="bitnet158", required=True, help="a configs/bitnet.yaml checkpoint")
    parser.add_argument("--bitnet1", required=True, help="the same with config.linear=bitnet1")
    parser.add_argument(
        "--fp32_baseline", default=None,
        help="the fp32 run the BitNet runs compare with, trained for as many steps as they were (default: --fp32)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32_checkpoint = checkpoints.load(args.fp32)
    datamodule = TinyShakespeareDataModule(**fp32_checkpoint.datamodule_hparams)  # the same val windows for all
    models, steps, file_bytes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        nf4_path = os.path.join(tmp, "nf4.pt")
        quantize_checkpoint(args.fp32, nf4_path, "nf4")
        sources = {"fp32": (args.fp32, None), "NF4": (nf4_path, None)}
        sources["fp32 baseline"] = (args.fp32_baseline or args.fp32, None)
        sources["BitNet b1.58"] = (args.bitnet158, "bitnet")
        sources["BitNet 1-bit"] = (args.bitnet1, "bitnet")
        for name, (path, pack) in sources.items():
            checkpoint = checkpoints.load(path)
            model = PicoGPT.from_checkpoint(checkpoint).eval()
            if pack:
                packed_path = os.path.join(tmp, f"{checkpoint.config.linear}.pt")
                quantize_checkpoint(path, packed_path, pack)
                trained, model = model, PicoGPT.from_checkpoint(packed_path).eval()
                probe = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
                with torch.no_grad():
                    assert torch.equal(trained(probe).logits, model(probe).logits), f"{name}: packed logits differ"
                path = packed_path
            models[name], steps[name], file_bytes[name] = model, checkpoint.global_step, os.path.getsize(path)

    losses = {name: val_loss(model, datamodule) for name, model in models.items()}
    speed = generation_tokens_per_second(models, models["fp32"].config.block_size - PROMPT_TOKENS, args.repeats)

    def row(name: str, baseline: str) -> list:
        weight_bytes, baseline_bytes = linear_weight_bytes(models[name]), linear_weight_bytes(models[baseline])
        weights = sum(m.in_features * m.out_features for m in linear_modules(models[name]))
        ppl, baseline_ppl = math.exp(losses[name]), math.exp(losses[baseline])
        return [
            name, steps[name], f"{weight_bytes:,}", f"{weight_bytes / baseline_bytes:.3f}x", f"{8 * weight_bytes / weights:.2f}",
            f"{losses[name]:.4f}", f"{ppl:.3f}", f"{100 * (ppl / baseline_ppl - 1):+.1f}%", f"{speed[name]:.0f}",
            f"{file_bytes[name] / 1e6:.2f} MB",
        ]

    headers = ["model", "steps", "linear weight bytes", "vs fp32", "bits / weight", "val loss", "val ppl",
               "ppl vs fp32", "tokens/s", "file"]
    nf4_ratio = linear_weight_bytes(models["NF4"]) / linear_weight_bytes(models["fp32"])
    nf4_ppl_change = math.exp(losses["NF4"] - losses["fp32"]) - 1
    same_steps = steps["fp32 baseline"] == steps["BitNet b1.58"] == steps["BitNet 1-bit"]
    reduced = (
        "" if steps["fp32 baseline"] == steps["fp32"] else
        f"\nThe CPU time available allowed {steps['fp32 baseline']} steps rather than pretrain_cpu's {steps['fp32']},"
        f"\nso all three models of this table, the fp32 one too, were trained with pretrain_cpu's recipe for"
        f"\n{steps['fp32 baseline']} steps (the cosine schedule ends at that step)."
    )

    def bitnet_gap(name: str) -> str:
        smaller = linear_weight_bytes(models["fp32 baseline"]) / linear_weight_bytes(models[name])
        return f"{losses[name] - losses['fp32 baseline']:+.4f} nats/token away with {smaller:.0f}x smaller linear weights"

    body = f"""`python -m benchmarks.bench_quant{"" if args.fp32 == FP32_CKPT else " --fp32 FP32"} --bitnet1.58 B158 --bitnet1 B1{"" if args.fp32_baseline is None else " --fp32_baseline FP32_SAME_STEPS"}` on {machine_description()}.

"Linear weights" are the blocks' projections, all that is quantized (embeddings, norms and the
tied lm_head stay fp32 in every model), with every scale they need counted. Val loss: next-token
cross-entropy over pretrain_cpu's 2400 validation windows, the same for every model. Generation:
greedy with the KV cache, one {PROMPT_TOKENS}-token prompt filled to the 64-token block, median of
{args.repeats} runs taking turns, so load on the machine weighs on all models alike (compare
tokens/s within a table, not with other sections). File: the checkpoint as written (fp32: Lightning's
.ckpt, optimizer state included; the others: the packed file `quantize` writes).

**NF4** (`quantize --method nf4`: block size 64, double-quantized absmax) of a configs/pretrain_cpu.yaml
checkpoint (char level, 4 layers, width 128):

{markdown_table(headers, [row("fp32", "fp32"), row("NF4", "fp32")])}

Linear weights **{nf4_ratio:.3f}x** fp32 (target <= 0.3x), val perplexity **{100 * nf4_ppl_change:+.2f}%**
(target <= +3%). NF4 decodes slower than fp32 here: every step dequantizes every weight again in plain
PyTorch, which no fused kernel hides on a CPU; the gain is memory.

**BitNet** trained from scratch with configs/bitnet.yaml (pretrain_cpu's recipe, learning rate and steps,
with `linear: bitnet1.58` or `bitnet1`), packed with `quantize --method bitnet` (2 bits per ternary
weight, 1 bit per binary weight, one fp32 scale per tensor); each packed model's logits were checked
identical to its training model's.{reduced}

{markdown_table(headers, [row("fp32 baseline", "fp32 baseline"), row("BitNet b1.58", "fp32 baseline"), row("BitNet 1-bit", "fp32 baseline")])}

Same steps for all three: {"yes" if same_steps else "**no**"}. Against fp32, BitNet b1.58 ends {bitnet_gap("BitNet b1.58")}
and 1-bit BitNet {bitnet_gap("BitNet 1-bit")}. The packed BitNet layers
decode slower than fp32 for NF4's reason: every step unpacks the codes again in plain PyTorch.
"""
    write_section("quantization", "Quantization: NF4 and BitNet", body)


def linear_modules(model: PicoGPT):
    return [m for m in model.blocks.modules() if isinstance(m, (nn.Linear, NF4Linear, PackedBitLinear))]


if __name__ == "__main__":
    main()
