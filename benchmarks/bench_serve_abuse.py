"""`serve` under abuse: well-behaved streaming clients beside abusive ones, and generate's memory for long prompts.

    python -m benchmarks.bench_serve_abuse [--clients 64] [--abusers 8] [--requests 4] [--max_tokens 32]

The server and model are bench_serve.py's (a random 4x128 char model, block 64). Two runs on one
server: the well-behaved clients alone, then the same clients while --abusers others loop, each
sending in turn an oversize prompt (past --max_prompt_tokens), extreme values (a seed of 2**64, a
temperature of 1e-300, five stop strings, one of 100,000 characters, top_p 0), a stream it drops after
the first token (a disconnect), and a request past --max_tokens_cap. Every well-behaved request must
stream all its tokens; every abusive one must get a 4xx or be dropped by its own client. Reported:
p50/p99 latency and time to first token of the well-behaved requests in both runs, and what the
abusive requests got.
"""

import argparse
import asyncio
import collections
import json
import signal
import tempfile
from pathlib import Path

import aiohttp

from benchmarks.bench_serve import build_checkpoint, run_clients, start_server, summary
from benchmarks.report import machine_description, markdown_table, write_section

ABUSE = [  # (label, request body)
    ("prompt past --max_prompt_tokens", {"prompt": "ROMEO: " * 3000, "max_tokens": 8}),
    ("seed 2**64", {"prompt": "ROMEO:", "seed": 2**64, "temperature": 1.0}),
    ("temperature 1e-300", {"prompt": "ROMEO:", "temperature": 1e-300}),
    ("five stop strings", {"prompt": "ROMEO:", "stop": ["a", "b", "c", "d", "e"]}),
    ("a 100,000-character stop string", {"prompt": "ROMEO:", "stop": "x" * 100_000}),
    ("top_p 0", {"prompt": "ROMEO:", "top_p": 0}),
    ("max_tokens past --max_tokens_cap", {"prompt": "ROMEO:", "max_tokens": 100_000}),
    ("disconnect after the first token", {"prompt": "ROMEO:", "max_tokens": 200, "stream": True}),
]


async def abuser(url: str, stop: asyncio.Event, outcomes: collections.Counter) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        turn = 0
        while not stop.is_set():
            label, body = ABUSE[turn % len(ABUSE)]
            turn += 1
            headers = {"Content-Type": "application/json"}
            async with session.post(url + "/v1/completions", data=json.dumps(body), headers=headers) as response:
                if body.get("stream") and response.status == 200:
                    await response.content.readline()  # the first event, then the connection is dropped
                    response.close()
                    outcomes[(label, "200, dropped")] += 1
                else:
                    await response.read()
                    outcomes[(label, str(response.status))] += 1


async def under_abuse(url: str, clients: int, abusers: int, requests: int, max_tokens: int):
    stop, outcomes = asyncio.Event(), collections.Counter()
    tasks = [asyncio.create_task(abuser(url, stop, outcomes)) for _ in range(abusers)]
    try:
        results = await run_clients(url, clients, requests, max_tokens)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--abusers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench.pt"
        build_checkpoint(ckpt)
        process, url = start_server(ckpt, "cpu", max_batch_size=args.clients)
        try:
            asyncio.run(run_clients(url, 1, 2, args.max_tokens))  # warm-up
            calm = asyncio.run(run_clients(url, args.clients, args.requests, args.max_tokens))
            abused, outcomes = asyncio.run(under_abuse(url, args.clients, args.abusers, args.requests, args.max_tokens))
            alive = process.poll() is None
        finally:
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=120)
    rows = [summary(f"{args.clients} clients alone", calm, args.max_tokens),
            summary(f"{args.clients} clients beside {args.abusers} abusive ones", abused, args.max_tokens)]
    headers = ["load", "requests", "tokens/s", "requests/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s"]
    abuse_rows = [[label, answer, count] for (label, answer), count in sorted(outcomes.items())]
    refused = all(answer.startswith("4") or answer.endswith("dropped") for (_, answer) in outcomes)
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_serve_abuse`: bench_serve.py's server and model; "
        f"{args.clients} well-behaved clients stream {args.requests} requests of {args.max_tokens} greedy tokens each, "
        f"first alone, then while {args.abusers} abusive clients loop through the requests below. Every well-behaved "
        f"request (summary() refuses the run otherwise) streamed all {args.max_tokens} tokens in both runs; the server "
        f"was {'still serving' if alive else 'DOWN'} after the abuse and exited {status} after SIGTERM.\n\n"
        + markdown_table(headers, rows)
        + "\n\nWhat the abusive requests got"
        + (" (every one a 4xx, or dropped by its own client):" if refused else " (NOT all refused):")
        + "\n\n" + markdown_table(["abusive request", "answer", "count"], abuse_rows)
    )
    write_section("serve_abuse", "Serving under abuse", body)


if __name__ == "__main__":
    main()
