"""The `serve` command under load: 64 concurrent streaming clients x 8 requests, against one client at a time.

    python -m benchmarks.bench_serve [--clients 64] [--requests 8] [--max_tokens 32] [--device cpu]

Builds a random model of the pretrain_cpu size (4 layers x 128, block 64, the corpus's 65
characters), starts `python -m picogpt_lightning serve` on a free port and streams completions
through the `openai` client (AsyncOpenAI, one event loop, so the clients cost the server's CPU
little). Each request asks max_tokens greedy tokens; latency is from sending the request to its
`data: [DONE]`, time to first token to its first text event. Every request must finish with
exactly max_tokens tokens, or the benchmark fails.
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


def start_server(ckpt: Path, device: str, max_batch_size: int):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "serve", "--ckpt", str(ckpt), "--port", str(port),
         "--device", device, "--max_batch_size", str(max_batch_size), "--batch_timeout", "0.02",
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench.pt"
        build_checkpoint(ckpt)
        process, url = start_server(ckpt, args.device, max_batch_size=args.clients)
        try:
            asyncio.run(run_clients(url, 1, 2, args.max_tokens))  # warm-up: first-call costs stay out of the numbers
            alone = asyncio.run(run_clients(url, 1, args.requests * 2, args.max_tokens))
            loaded = asyncio.run(run_clients(url, args.clients, args.requests, args.max_tokens))
        finally:
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=120)
    rows = [summary("1 client at a time", alone, args.max_tokens),
            summary(f"{args.clients} concurrent clients", loaded, args.max_tokens)]
    speedup = float(rows[1][2]) / float(rows[0][2])
    headers = ["load", "requests", "tokens/s", "requests/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s"]
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_serve`: a random 4x128 char model (block 64) behind "
        f"`serve --max_batch_size {args.clients} --batch_timeout 0.02 --device {args.device}`; each request streams "
        f"{args.max_tokens} greedy tokens through the `openai` client. All {len(loaded)} concurrent requests completed "
        f"with {args.max_tokens} tokens; the server exited {status} after SIGTERM.\n\n"
        + markdown_table(headers, rows)
        + f"\n\nBatching concurrent requests into one static-cache decode gives {speedup:.1f}x the tokens/s of one "
        "client at a time; a request's latency under load includes waiting for the batch ahead of it to finish "
        "(LitServe batches are decoded to their end before the next begins)."
    )
    write_section("serve", "Serving: LitServe /v1/completions", body)


if __name__ == "__main__":
    main()
