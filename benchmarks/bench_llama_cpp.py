"""Decoding against llama.cpp: batch-1 greedy tokens/s of the project's fastest paths and of llama.cpp, same weights.

    python -m benchmarks.bench_llama_cpp [--new_tokens 128] [--rounds 3] [--smoke]

Three models with random weights (speed does not depend on them): configs/pretrain_cpu.yaml's size
(4x128), configs/pretrain.yaml's (6x384) and a ~100M-parameter one (12 layers x 768, 16,384 tokens).
The project decodes through its static compiled step in fp32 and with int8 and int4 weights
(torch's weight-only kernels); llama.cpp (llama-cpp-python) runs the same weights exported by
`export --format gguf` as f32, f16, q8_0 and q4_0. Each runs with 1 and 2 threads, in interleaved
rounds on the same machine; pairs at about the same bits per weight: fp32/f32, int8/q8_0, int4/q4_0.
A torch profile of the project's fp32 step at one thread says where its time goes.
"""

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.gguf_export import write_gguf
from picogpt_lightning.quant import quantize_int4, quantize_int8
from picogpt_lightning.tokenizer import build_tokenizer

SIZES = {
    "4x128": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65),
    "12x768 (~100M)": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=16384),
}
PROJECT = {"fp32": None, "int8": quantize_int8, "int4": quantize_int4}
LLAMA_CPP = ("f32", "f16", "q8_0", "q4_0")
PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))
PROMPT_TOKENS = 8
THREADS = (1, 2)


def project_run(model: PicoGPT, prompt: torch.Tensor, new_tokens: int, threads: int):
    def run():
        torch.set_num_threads(threads)
        model.generate(prompt, max_new_tokens=new_tokens, cache_implementation="static")
    return run


def llama_cpp_run(path: str, prompt: list, new_tokens: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=PROMPT_TOKENS + new_tokens + 8, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run():
        for count, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), start=1):
            if count == new_tokens:
                break
    return run


def measure(size: dict, new_tokens: int, rounds: int, work: str) -> dict:
    """{(engine format, threads): tokens/s, median over interleaved rounds}."""
    torch._dynamo.reset()  # the last size's compiled steps: each size compiles its own
    torch.manual_seed(0)
    model = PicoGPT(PicoGPTConfig(block_size=PROMPT_TOKENS + new_tokens + 8, **size)).eval()
    tokenizer = build_tokenizer("char", "".join(chr(32 + i) for i in range(64)) + "\n")  # 65 symbols
    prompt = torch.randint(0, 65, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, quantize in PROJECT.items():
        packed = model if quantize is None else quantize(copy.deepcopy(model)).eval()
        for threads in THREADS:
            runs[f"project {name}", threads] = project_run(packed, prompt, new_tokens, threads)
    for gguf_type in LLAMA_CPP:
        path = os.path.join(work, f"model.{gguf_type}.gguf")
        write_gguf(copy.deepcopy(model), tokenizer, path, gguf_type)
        for threads in THREADS:
            runs[f"llama.cpp {gguf_type}", threads] = llama_cpp_run(path, prompt[0].tolist(), new_tokens, threads)
    for run in runs.values():  # warm-up: compiles each static step, loads each file
        run()
    seconds = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
    return {key: new_tokens / statistics.median(values) for key, values in seconds.items()}


def profile(size: dict, new_tokens: int) -> str:
    """The project's fp32 static compiled decoding at one thread: the operators that take its time."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = PicoGPT(PicoGPTConfig(block_size=PROMPT_TOKENS + new_tokens + 8, **size)).eval()
    prompt = torch.randint(0, 65, (1, PROMPT_TOKENS))
    model.generate(prompt, max_new_tokens=new_tokens, cache_implementation="static")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model.generate(prompt, max_new_tokens=new_tokens, cache_implementation="static")
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return ", ".join(f"{operator_name(event.key)} {100 * event.self_cpu_time_total / total:.0f}%" for event in events[:6])


def operator_name(key: str) -> str:
    """The profiler's key, with inductor's generated graph called what it is."""
    return "the compiled graph's fused kernels and wrapper" if "CompiledFxGraph" in key else key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the small model only, few tokens")
    args = parser.parse_args()
    # dynamo guards on the thread count: each format keeps one compiled step per thread count as the rounds alternate
    torch._dynamo.config.recompile_limit = 64
    sizes = {"4x128": SIZES["4x128"]} if args.smoke else SIZES
    results, profiles = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for label, size in sizes.items():
            results[label] = measure(size, args.new_tokens, args.rounds, work)
            profiles[label] = profile(size, args.new_tokens)
            print(label, {f"{k[0]} t{k[1]}": round(v) for k, v in results[label].items()}, flush=True)
    torch.set_num_threads(max(THREADS))  # the report's machine line names the most threads any run used
    report(args, results, profiles)


def report(args, results: dict, profiles: dict) -> None:
    engines = [f"project {name}" for name in PROJECT] + [f"llama.cpp {t}" for t in LLAMA_CPP]
    rows = [(label, threads, *(f"{speeds[engine, threads]:.0f}" for engine in engines))
            for label, speeds in results.items() for threads in THREADS]
    pair_rows = []
    for label, speeds in results.items():
        for threads in THREADS:
            ratios = [speeds[f"project {ours}", threads] / speeds[f"llama.cpp {theirs}", threads] for ours, theirs in PAIRS]
            pair_rows.append((label, threads, *(f"{ratio:.2f}x" for ratio in ratios)))
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_llama_cpp --new_tokens {args.new_tokens} --rounds "
        f"{args.rounds}`: batch 1, greedy, a {PROMPT_TOKENS}-token prompt, tokens/s over the whole call "
        f"(medians of {args.rounds} interleaved rounds); the project on its static compiled step, llama.cpp through "
        "llama-cpp-python on the file `export --format gguf` writes.\n\n"
        + markdown_table(["model", "threads", *engines], rows)
        + "\n\nThe project against llama.cpp at about the same bits per weight (above 1.00x: the project is faster):\n\n"
        + markdown_table(["model", "threads", "fp32 / f32", "int8 / q8_0", "int4 / q4_0"], pair_rows)
        + "\n\nWhere the project's fp32 step spends its time at one thread (torch profiler, self CPU time): "
        + "; ".join(f"{label}: {summary}" for label, summary in profiles.items()) + "."
    )
    write_section("llama_cpp", "Decoding against llama.cpp", body)


if __name__ == "__main__":
    main()
