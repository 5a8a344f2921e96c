"""The `serve` command under load: 64 concurrent streaming clients x 8 requests, against one client at a time
and against the engine itself.

    python -m benchmarks.bench_serve [--clients 64] [--requests 8] [--max_tokens 32] [--device cpu] [--smoke]

Builds a random model of the pretrain_cpu size (4 layers x 128, block 64, the corpus's 65
characters), starts `python -m picogpt_lightning serve --compile true` on a free port and streams
completions through the `openai` client (AsyncOpenAI, one event loop, so the clients cost the
server's CPU little). Each request asks max_tokens greedy tokens; latency is from sending the
request to its `data: [DONE]`, time to first token to its first text event. Every request must
finish with exactly max_tokens tokens, or the benchmark fails.

The yardstick, measured in the same run before the server starts: `generate` on a batch of as
many prompts as clients, static cache, compiled decode step, max_tokens new tokens (prefill
included). And the continuous batch's promise: an 8-token request sent while a 500-token one
streams, against the same request alone.
"""

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
from picogpt_lightning.tokenizer import build_tokenizer

PROMPTS = ["ROMEO:", "JULIET:\nO ", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the"]


def build_checkpoint(path: Path) -> None:
    corpus = Path(os.environ.get("PICOGPT_DATA", "../shared/data/tinyshakespeare/input.txt")).read_text()
    tokenizer = build_tokenizer("char", corpus)
    torch.manual_seed(0)
    config = PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128)
    checkpoints.save(path, PicoGPT(config).eval(), tokenizer)


def engine_rate(ckpt: Path, device: str, batch: int, max_tokens: int) -> float:
    """Tokens/s of `generate` over `batch` prompts at once, static cache, compiled step (after a compiling run)."""
    from picogpt_lightning.generation import encode_prompts
    from picogpt_lightning.tokenizer import Tokenizer

    model = PicoGPT.from_checkpoint(str(ckpt)).eval().to(device)
    tokenizer = Tokenizer.from_checkpoint(str(ckpt))
    prompts = [PROMPTS[number % len(PROMPTS)] for number in range(batch)]
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, torch.device(device))

    def run():
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                       cache_implementation="static", pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(3):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return batch * max_tokens / statistics.median(times)


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of process `root` and all its descendants, from /proc (0 where there is none)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, times = {}, {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.parent.name)
        parents[pid], times[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    family, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in family and pid not in family:
                family.add(pid)
                grew = True
    return sum(times.get(pid, 0.0) for pid in family)


def start_server(ckpt: Path, device: str, max_batch_size: int):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "serve", "--ckpt", str(ckpt), "--port", str(port),
         "--device", device, "--max_batch_size", str(max_batch_size), "--compile", "true",
         "--log_level", "warning"],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    sys.exit("the server was not ready within 300 s")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, text = None, ""
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text += chunk.choices[0].text
    end = time.perf_counter()
    return dict(latency=end - start, ttft=first - start, tokens=len(text), start=start, end=end)


async def behind_a_long_one(url: str, short_tokens: int = 8, long_tokens: int = 500, repeats: int = 5):
    """Median latency of a short request alone, and sent while a long one streams (after its first token)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    alone, behind = [], []
    for _ in range(repeats):
        alone.append((await one_request(client, PROMPTS[0], short_tokens))["latency"])
        stream = await client.completions.create(model="bench", prompt=PROMPTS[1], max_tokens=long_tokens,
                                                 temperature=0, stream=True)
        chunks = stream.__aiter__()
        await chunks.__anext__()  # the long request is decoding
        behind.append((await one_request(client, PROMPTS[0], short_tokens))["latency"])
        async for _ in chunks:  # read to its end, so the next round starts alone
            pass
    await client.close()
    return statistics.median(alone), statistics.median(behind)


async def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> list:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one_client(number: int) -> list:
        return [await one_request(client, PROMPTS[(number + i) % len(PROMPTS)], max_tokens) for i in range(requests)]

    results = await asyncio.gather(*(one_client(number) for number in range(clients)))
    await client.close()
    return [result for per_client in results for result in per_client]


def summary(label: str, results: list, max_tokens: int) -> list:
    incomplete = [result for result in results if result["tokens"] != max_tokens]
    if incomplete:
        sys.exit(f"{label}: {len(incomplete)} of {len(results)} requests did not get {max_tokens} tokens")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return [
        label, len(results), f"{sum(r['tokens'] for r in results) / wall:.0f}", f"{len(results) / wall:.1f}",
        f"{statistics.median(latencies):.2f}", f"{pct(latencies, 0.99):.2f}",
        f"{statistics.median(ttfts):.3f}", f"{pct(ttfts, 0.99):.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="4 clients x 2 requests, nothing written")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests = 4, 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench.pt"
        build_checkpoint(ckpt)
        engine = engine_rate(ckpt, args.device, args.clients, args.max_tokens)
        process, url = start_server(ckpt, args.device, max_batch_size=args.clients)
        try:
            # warm-up: every row count's decode step compiles here, out of the numbers
            asyncio.run(run_clients(url, 1, 2, args.max_tokens))
            asyncio.run(run_clients(url, args.clients, 2, args.max_tokens))
            alone = asyncio.run(run_clients(url, 1, args.requests * 2, args.max_tokens))
            server_cpu, clients_cpu, began = cpu_seconds(process.pid), cpu_seconds(os.getpid()), time.perf_counter()
            loaded = asyncio.run(run_clients(url, args.clients, args.requests, args.max_tokens))
            wall = time.perf_counter() - began
            server_cpu = cpu_seconds(process.pid) - server_cpu
            clients_cpu = cpu_seconds(os.getpid()) - clients_cpu - server_cpu  # the server is this process's child
            short_alone, short_behind = asyncio.run(behind_a_long_one(url))
        finally:
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=120)
    rows = [summary("1 client at a time", alone, args.max_tokens),
            summary(f"{args.clients} concurrent clients", loaded, args.max_tokens)]
    speedup = float(rows[1][2]) / float(rows[0][2])
    of_engine = float(rows[1][2]) / engine
    headers = ["load", "requests", "tokens/s", "requests/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s"]
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_serve`: a random 4x128 char model (block 64) behind "
        f"`serve --max_batch_size {args.clients} --compile true --device {args.device}` (continuous batching); each "
        f"request streams {args.max_tokens} greedy tokens through the `openai` client. All {len(loaded)} concurrent "
        f"requests completed with {args.max_tokens} tokens; the server exited {status} after SIGTERM. Load average "
        f"(1 min) at start and end: {load_before:.1f}, {os.getloadavg()[0]:.1f}.\n\n"
        + markdown_table(headers, rows)
        + f"\n\n- The engine alone, `generate` on {args.clients} prompts at once (static cache, compiled step, "
        f"{args.max_tokens} new tokens, prefill included), measured in the same run: {engine:.0f} tokens/s. "
        f"{args.clients} streaming clients get **{of_engine:.2f}x** of it (target >= 0.7x), "
        f"{speedup:.1f}x one client at a time.\n"
        f"- p99 time to first token under load: **{float(rows[1][7]):.3f} s** (target <= 0.3 s).\n"
        f"- An 8-token request: {short_alone:.3f} s alone, {short_behind:.3f} s sent while a 500-token request "
        f"streams: **{short_behind / short_alone:.2f}x** (target <= 2x; median of 5). It joins the running batch at "
        "the next step instead of waiting for the long one to end.\n"
        f"- Where the CPU went while the {args.clients} clients ran ({wall:.1f} s on {os.cpu_count()} cores: "
        f"{wall * os.cpu_count():.1f} core-seconds): the server's processes (API server, LitServe's manager, the "
        f"inference worker) {server_cpu:.1f} s, the clients {clients_cpu:.1f} s. On a CPU the engine shares the "
        "cores with the HTTP side and the clients; its own measure above pays for neither."
    )
    if args.smoke:
        print(body)
        return
    write_section("serve", "Serving: LitServe /v1/completions", body)


if __name__ == "__main__":
    main()
