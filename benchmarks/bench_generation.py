"""Decoding speed: the KV cache against recomputing every step, and beam search against transformers.

    flock /tmp/picogpt_bench.lock python -m benchmarks.bench_generation [--new_tokens 256] [--repeats 3]

Models are random (speed does not depend on the weights) in two sizes: configs/pretrain_cpu.yaml's
(4 layers, 4 heads, width 128) and configs/pretrain.yaml's (6 layers, 6 heads, width 384), both
with block_size 512 instead of 64/256 so that a 32-token prompt + 256 new tokens fit.
Targets: the cache >= 5x faster than no cache; 4-beam search not slower than transformers'
generate on the same weights exported with picogpt_lightning.hf.to_hf (outputs must be identical).
"""

import argparse
import statistics
import time

import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.hf import to_hf

# model size -> batch sizes of the cache comparison (a batch of 8 without the cache takes too long at 6x384)
SIZES = {
    "pretrain_cpu size (4x128)": (dict(n_layer=4, n_head=4, n_embd=128), (1, 8)),
    "pretrain size (6x384)": (dict(n_layer=6, n_head=6, n_embd=384), (1,)),
}
VOCAB = 65  # tiny_shakespeare's characters
PROMPT_TOKENS = 32
BLOCK_SIZE = 512


def median_seconds(runs: dict, repeats: int) -> dict:
    """Median seconds of each run, after a warm-up; the runs take turns, so a change in
    machine load during the benchmark weighs on all of them alike."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--beam_tokens", type=int, default=64, help="new tokens for the beam search comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cache_rows, beam_rows, speedups = [], [], []
    for name, (size, batch_sizes) in SIZES.items():
        torch.manual_seed(0)
        model = PicoGPT(PicoGPTConfig(vocab_size=VOCAB, block_size=BLOCK_SIZE, **size)).eval()
        millions = model.num_parameters() / 1e6
        for batch in batch_sizes:
            prompts = torch.randint(0, VOCAB, (batch, PROMPT_TOKENS))

            def decode(use_cache, prompts=prompts):
                return lambda: model.generate(prompts, max_new_tokens=args.new_tokens, use_cache=use_cache)

            assert torch.equal(decode(True)(), decode(False)())
            seconds = median_seconds({"cache": decode(True), "no cache": decode(False)}, args.repeats)
            tokens = batch * args.new_tokens
            speedups.append((name, batch, seconds["no cache"] / seconds["cache"]))
            cache_rows.append([
                name, f"{millions:.2f}M", batch, f"{tokens / seconds['no cache']:.0f}",
                f"{tokens / seconds['cache']:.0f}", f"**{seconds['no cache'] / seconds['cache']:.1f}x**",
            ])

        prompt = torch.randint(0, VOCAB, (1, PROMPT_TOKENS))
        llama = to_hf(model)
        beams = dict(max_new_tokens=args.beam_tokens, num_beams=4)
        ours_out = model.generate(prompt, **beams)
        theirs_out = llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, **beams)
        identical = torch.equal(ours_out, theirs_out)
        seconds = median_seconds(
            {
                "ours": lambda: model.generate(prompt, **beams),
                "theirs": lambda: llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, **beams),
            },
            args.repeats,
        )
        ours, theirs = seconds["ours"], seconds["theirs"]
        beam_rows.append([
            name, f"{ours * 1000:.0f}", f"{theirs * 1000:.0f}", f"**{theirs / ours:.2f}x**", "yes" if identical else "NO",
        ])

    body = (
        f"`flock /tmp/picogpt_bench.lock python -m benchmarks.bench_generation` on {machine_description()} "
        f"(one thread: the 2 cores are shared, and small decoding ops lose more to thread synchronisation "
        f"than they gain). Random weights, vocabulary {VOCAB}, block_size {BLOCK_SIZE} (so that the "
        f"{PROMPT_TOKENS}-token prompt + {args.new_tokens} new tokens fit), greedy; median of "
        f"{args.repeats} alternating runs after a warm-up, both numbers of a row from the same run.\n\n"
        f"KV cache ({args.new_tokens} new tokens; target: cache >= 5x faster):\n\n"
        + markdown_table(["model", "params", "batch", "tokens/s, no cache", "tokens/s, cache", "speed-up"], cache_rows)
        + short_of_target_note(speedups)
        + f"\n\nBeam search, 4 beams, {args.beam_tokens} new tokens, against transformers' `generate` on the "
        f"same weights exported with `to_hf` (target: not slower):\n\n"
        + markdown_table(
            ["model", "PicoGPT ms", "transformers ms", "PicoGPT speed-up", "identical tokens"], beam_rows
        )
    )
    write_section("generation", "Generation: KV cache and beam search", body)


def short_of_target_note(speedups) -> str:
    short = [f"{name} at batch {batch} ({ratio:.1f}x)" for name, batch, ratio in speedups if ratio < 5]
    if not short:
        return ""
    return (
        f"\n\nShort of 5x: {', '.join(short)}. A cached step of so small a model is bound by the fixed cost "
        "of its few hundred eager PyTorch ops rather than by arithmetic, which the cache cannot remove; "
        "decoding several prompts at once (the batch-8 row) spreads that cost.\n"
    )


if __name__ == "__main__":
    main()
