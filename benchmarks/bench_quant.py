"""Quantization: decoding speed, resident weight bytes, file bytes and val loss of every packed format.

    python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml [--model.init_args.config.linear bitnet1.58|bitnet1]
    python -m benchmarks.bench_quant --fp32 SMALL BIG --bitnet1.58 SMALL BIG --bitnet1 SMALL BIG

SMALL is configs/pretrain_cpu.yaml's size (4 layers, width 128), BIG the pretrain size (6 layers,
width 384, 2 key/value groups), each trained with pretrain_cpu's recipe; NF4, int8 and int4 are the
fp32 checkpoint through the `quantize` command, BitNet b1.58 and 1-bit the BitNet checkpoints through
`quantize --method bitnet`. Every packed file is loaded with PicoGPT.from_checkpoint, as `generate` does.
Targets at batch 1: every packed format >= 1.5x fp32's tokens/s at 6x384 and >= 1.0x at 4x128; resident
weight bytes <= 0.3x fp32's; val perplexity within +3% of fp32 for NF4, int8 and int4.
"""

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
from transformers import GenerationConfig

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.pipeline import val_loss
from picogpt_lightning.commands.quantize import quantize_checkpoint
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.quant import Int4WeightLinear, Int8WeightLinear, NF4Linear, PackedBitLinear
from picogpt_lightning.quant.kernels import resident_bytes

PROMPT_TOKENS = 8
BATCHES = (1, 8)
# format -> (source checkpoint, quantize method)
FORMATS = {
    "fp32": ("fp32", None), "NF4": ("fp32", "nf4"), "int8": ("fp32", "int8"), "int4": ("fp32", "int4"),
    "BitNet b1.58": ("bitnet1.58", "bitnet"), "BitNet 1-bit": ("bitnet1", "bitnet"),
}
TARGET_SPEEDUP = {"small": 1.0, "big": 1.5}
LINEAR_TYPES = (torch.nn.Linear, NF4Linear, Int8WeightLinear, Int4WeightLinear, PackedBitLinear)
SIZE_NAMES = {"small": "4x128 (pretrain_cpu size)", "big": "6x384 (pretrain size)"}


def load_formats(sources: dict, tmp: str) -> dict:
    """{format: (model, file bytes, training steps)}; each packed format written by `quantize` and read back."""
    loaded = {}
    for name, (source, method) in FORMATS.items():
        path = sources[source]
        steps = checkpoints.load(path).global_step
        if method is None:  # fp32's file: the weights alone, as PicoGPT.save writes them (no optimizer state)
            model = PicoGPT.from_checkpoint(path).eval()
            out = os.path.join(tmp, "fp32.pt")
            model.save(out)
        else:
            out = os.path.join(tmp, f"{source}-{method}.pt")
            quantize_checkpoint(path, out, method)
            model = PicoGPT.from_checkpoint(out).eval()
        loaded[name] = (model, os.path.getsize(out), steps)
    return loaded


def decode_paths(model: PicoGPT, name: str) -> dict:
    """The ways each format decodes: every format through the static compiled step (inductor, fullgraph),
    fp32 also eagerly with the growing cache, so that fp32 is timed on its fastest path."""
    paths = {"static compiled": dict(cache_implementation="static")}
    if name == "fp32":
        paths["growing"] = dict(generation_config=GenerationConfig(disable_compile=True))
    return paths


def time_decoding(models: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """{(format, path): [seconds per run]}: greedy generation, every (format, path) taking turns each round."""
    prompt = torch.randint(0, 65, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    runs = {(name, path): (model, options) for name, model in models.items() for path, options in decode_paths(model, name).items()}
    for model, options in runs.values():  # warm-up: compiles each step once
        model.generate(prompt, max_new_tokens=new_tokens, **options)
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (model, options) in runs.items():
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, **options)
            times[key].append(time.perf_counter() - start)
    return times


def fastest_fp32(times: dict) -> str:
    return min((path for name, path in times if name == "fp32"), key=lambda path: statistics.median(times["fp32", path]))


def paired_speedups(times: dict, batch: int, new_tokens: int) -> dict:
    """{format: (tokens/s, median over rounds of fp32's time / the format's time in the same round)}."""
    fp32 = times["fp32", fastest_fp32(times)]
    result = {}
    for (name, path), values in times.items():
        if name == "fp32" and path != fastest_fp32(times):
            continue
        ratios = [base / value for base, value in zip(fp32, values)]
        result[name] = (batch * new_tokens / statistics.median(values), statistics.median(ratios))
    return result


def linear_bytes(model: PicoGPT) -> int:
    """Resident bytes of the blocks' projections (all that is quantized), kernel layouts and scales included."""
    return sum(resident_bytes(m) for m in model.blocks.modules() if isinstance(m, LINEAR_TYPES))


def measure_size(size: str, sources: dict, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_formats(sources, tmp)
    models = {name: model for name, (model, _, _) in loaded.items()}
    fp32_checkpoint = checkpoints.load(sources["fp32"])
    datamodule = TinyShakespeareDataModule(**fp32_checkpoint.datamodule_hparams)  # the same val windows for all
    losses = {name: val_loss(model, datamodule) for name, model in models.items()}
    new_tokens = models["fp32"].config.block_size - PROMPT_TOKENS
    speed, paths = {}, {}
    for batch in BATCHES:
        times = time_decoding(models, batch, new_tokens, repeats)
        speed[batch], paths[batch] = paired_speedups(times, batch, new_tokens), fastest_fp32(times)
    torch._dynamo.reset()
    return dict(
        loaded=loaded, losses=losses, speed=speed, fp32_path=paths, new_tokens=new_tokens,
        resident={name: resident_bytes(model) for name, model in models.items()},
        linear={name: linear_bytes(model) for name, model in models.items()},
        params=sum(p.numel() for p in models["fp32"].parameters()),
    )


def size_table(size: str, result: dict) -> str:
    headers = ["format", "steps", "tokens/s b=1", "vs fp32 b=1", "tokens/s b=8", "vs fp32 b=8", "resident bytes",
               "vs fp32", "linear-weight bytes", "bits / linear weight", "file", "val loss", "val ppl vs fp32 (same steps)"]
    rows = []
    for name, (_, file_bytes, steps) in result["loaded"].items():
        baseline = "fp32"
        ppl_change = 100 * (math.exp(result["losses"][name] - result["losses"][baseline]) - 1)
        weights = result["linear"]["fp32"] / 4
        cells = [name, steps]
        for batch in BATCHES:
            tokens, ratio = result["speed"][batch][name]
            cells += [f"{tokens:.0f}", f"**{ratio:.2f}x**" if batch == 1 else f"{ratio:.2f}x"]
        cells += [
            f"{result['resident'][name]:,}", f"**{result['resident'][name] / result['resident']['fp32']:.3f}x**",
            f"{result['linear'][name]:,}", f"{8 * result['linear'][name] / weights:.2f}", f"{file_bytes / 1e6:.2f} MB",
            f"{result['losses'][name]:.4f}", f"{ppl_change:+.1f}%",
        ]
        rows.append(cells)
    return markdown_table(headers, rows)


def verdicts(results: dict) -> str:
    """The targets, each with its measured number."""
    lines = []
    for size, result in results.items():
        for name in FORMATS:
            if name == "fp32":
                continue
            ratio = result["speed"][1][name][1]
            memory = result["resident"][name] / result["resident"]["fp32"]
            ok_speed, ok_memory = ratio >= TARGET_SPEEDUP[size], memory <= 0.3
            line = f"{SIZE_NAMES[size]}, {name}: speed {ratio:.2f}x ({'met' if ok_speed else 'NOT met'}, target "
            line += f">= {TARGET_SPEEDUP[size]}x), resident {memory:.3f}x ({'met' if ok_memory else 'NOT met'})"
            if name in ("NF4", "int8", "int4"):
                ppl = 100 * (math.exp(result["losses"][name] - result["losses"]["fp32"]) - 1)
                line += f", val ppl {ppl:+.2f}% ({'met' if ppl <= 3 else 'NOT met'}, target <= +3%)"
            lines.append(f"- {line}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", nargs=2, required=True, metavar=("SMALL", "BIG"), help="configs/pretrain_cpu.yaml runs")
    parser.add_argument("--bitnet1.58", dest="bitnet158", nargs=2, required=True, metavar=("SMALL", "BIG"))
    parser.add_argument("--bitnet1", nargs=2, required=True, metavar=("SMALL", "BIG"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops on shared cores)")
    parser.add_argument("--sizes", nargs="+", default=["small", "big"], choices=["small", "big"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    results = {}
    for index, size in enumerate(("small", "big")):
        if size not in args.sizes:
            continue
        sources = {"fp32": args.fp32[index], "bitnet1.58": args.bitnet158[index], "bitnet1": args.bitnet1[index]}
        results[size] = measure_size(size, sources, args.repeats)
    load.append(os.getloadavg()[0])
    write_section("quantization", "Quantization: packed formats decoding through kernels", report(results, args.repeats, load))


def report(results: dict, repeats: int, load: list) -> str:
    tables = "\n\n".join(
        f"**{SIZE_NAMES[size]}**, {result['params'] / 1e6:.2f}M parameters, {result['new_tokens']} new tokens after an "
        f"{PROMPT_TOKENS}-token prompt; fp32's fastest path: {result['fp32_path'][1]} (batch 1), "
        f"{result['fp32_path'][8]} (batch 8).\n\n{size_table(size, result)}"
        for size, result in results.items()
    )
    return f"""`python -m benchmarks.bench_quant --fp32 SMALL BIG --bitnet1.58 SMALL BIG --bitnet1 SMALL BIG` on {machine_description()}.
Load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f} (2 shared cores).

Each packed file is what `quantize` writes, loaded by `PicoGPT.from_checkpoint`. Kernels (picogpt_lightning/quant/):
int8 and int4 through torch's weight-only CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
bfloat16 activations); BitNet's ternary and binary codes as int8 weights with unit scales through the int8
kernel, with its 8-bit activations; NF4 through the fused AVX2 dequantize-matmul of quant/nf4_kernel.py, a
torch operator registered in C++ (no library's NF4 kernel runs on this CPU: bitsandbytes' needs AVX-512 BF16).
Decoding: greedy, every format through the static cache and the compiled step (inductor, fullgraph, one graph per shape), fp32 also eagerly with the growing cache; speed-ups
are the median over {repeats} rounds of fp32's time over the format's time in the same round, formats taking
turns, so load weighs on all alike. Resident bytes: every parameter and buffer the model holds while
decoding (kernel layouts, scales, embeddings and norms). File: fp32 as `PicoGPT.save` writes its weights,
the others as `quantize` writes them. Val loss: next-token cross-entropy over pretrain_cpu's 2400 validation
windows; BitNet is trained as BitNet, so its difference from fp32 is training's, not packing's. Steps: how
long each checkpoint trained with pretrain_cpu's recipe (fewer than its 2000 steps, to fit the CPU time; the
fp32 row of a table trained as long as its BitNet rows). On shared cores the rounds vary: compare ratios,
measured in pairs, rather than the tokens/s columns, which are medians taken separately.

{tables}

Targets at batch 1:

{verdicts(results)}
"""


if __name__ == "__main__":
    main()
