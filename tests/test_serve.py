"""python -m picogpt_lightning serve, end to end: a real server process, the `openai` client, and
`generate`'s output as the reference for what the server must write.

One server for the module (starting one takes seconds); requests sent together join one continuous
batch. The SIGTERM test stops it, so it runs last.
"""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import urllib.error
import urllib.request

import openai
import pytest
import torch

from factories import randomize
from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
from picogpt_lightning.cli import main
from picogpt_lightning.tokenizer import build_tokenizer

TEXT = "to be, or not to be, that is the question:\nwhether 'tis nobler in the mind to suffer\n"


def post(url: str, content: bytes):
    """(status, body text) of a raw POST: bodies the openai client would never send."""
    request = urllib.request.Request(url, data=content, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random char model: random weights (not a fresh init) so that greedy text varies from token to token."""
    tokenizer = build_tokenizer("char", TEXT)
    torch.manual_seed(0)
    config = PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    checkpoints.save(path, randomize(PicoGPT(config).eval()), tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "serve", "--ckpt", checkpoint, "--port", str(port),
         "--log_level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        if healthy(url):
            break
        assert time.monotonic() < deadline, "the server did not become healthy in 120 s"
        time.sleep(0.2)
    yield process, url
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def generated(capsys, checkpoint, prompt, max_new_tokens, *options) -> str:
    """What `generate` adds to the prompt: the reference the server must match."""
    main(["generate", "--ckpt", checkpoint, "--prompt", prompt, "--max_new_tokens", str(max_new_tokens), *options])
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt) : -1]


def test_greedy_completion_is_generates_text(client, checkpoint, capsys):
    expected = generated(capsys, checkpoint, "to be", 20)
    response = client.completions.create(model="tiny", prompt="to be", max_tokens=20, temperature=0)
    assert response.choices[0].text == expected and len(expected) == 20
    assert response.choices[0].finish_reason == "length" and response.object == "text_completion"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (5, 20)


def test_streaming_yields_the_same_text_then_done(client, server, checkpoint, capsys):
    expected = generated(capsys, checkpoint, "whether", 25)
    stream = client.completions.create(
        model="tiny", prompt="whether", max_tokens=25, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    assert len([chunk for chunk in chunks if chunk.choices]) == 25  # one event per token
    assert chunks[-1].usage.completion_tokens == 25 and chunks[-2].choices[0].finish_reason == "length"
    body = {"prompt": "whether", "max_tokens": 3, "temperature": 0, "stream": True}
    status, raw = post(server[1] + "/v1/completions", json.dumps(body).encode())
    assert status == 200 and raw.endswith("data: [DONE]\n\n") and raw.count("data: ") == 4


def test_concurrent_requests_are_batched_and_each_is_generates_text(client, checkpoint, capsys):
    prompts = {"to be": 20, "whether 'tis": 12, "the mind": 30, "t": 7}
    expected = {prompt: generated(capsys, checkpoint, prompt, tokens) for prompt, tokens in prompts.items()}
    with ThreadPoolExecutor(len(prompts)) as pool:  # sent together: rows of one continuous batch
        futures = {
            prompt: pool.submit(client.completions.create, model="tiny", prompt=prompt, max_tokens=tokens, temperature=0)
            for prompt, tokens in prompts.items()
        }
    assert {prompt: future.result().choices[0].text for prompt, future in futures.items()} == expected
    several = client.completions.create(model="tiny", prompt=list(prompts), max_tokens=7, temperature=0)
    assert [choice.text for choice in several.choices] == [expected[prompt][:7] for prompt in prompts]


def test_a_seeded_sample_beside_greedy_requests_is_generates_sample(client, checkpoint, capsys):
    sample_options = ["--do_sample", "true", "--temperature", "0.9", "--top_k", "10", "--seed", "5"]
    expected_sample = generated(capsys, checkpoint, "to", 30, *sample_options)
    expected_greedy = generated(capsys, checkpoint, "to", 30)
    assert expected_sample != expected_greedy
    with ThreadPoolExecutor(3) as pool:  # different settings in one batch: each row chooses by its own
        sample = pool.submit(
            client.completions.create, model="tiny", prompt="to", max_tokens=30, temperature=0.9, seed=5,
            extra_body={"top_k": 10},
        )
        greedy = [pool.submit(client.completions.create, model="tiny", prompt="to", max_tokens=30, temperature=0)
                  for _ in range(2)]
    assert sample.result().choices[0].text == expected_sample
    assert [future.result().choices[0].text for future in greedy] == [expected_greedy] * 2


def test_stop_strings_end_the_text_before_them_streamed_or_not(client, checkpoint, capsys):
    expected = generated(capsys, checkpoint, "to be", 40)
    stop = expected[15:17]
    cut = expected[: expected.find(stop)]
    response = client.completions.create(model="tiny", prompt="to be", max_tokens=40, temperature=0, stop=[stop, "QQ"])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (cut, "stop")
    stream = client.completions.create(model="tiny", prompt="to be", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == cut


BAD_REQUESTS = [  # (body, status, words the message must hold)
    ({"prompt": "", "max_tokens": 5}, 400, "prompt"),
    ({"prompt": "to", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "to", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "to", "max_tokens": 5, "top_kk": 3}, 400, "unknown parameter 'top_kk'"),
    ({"prompt": "to", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "to", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "to", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "to", "logprobs": 3}, 400, "logprobs is not supported"),
    ({"prompt": "XYZ", "max_tokens": 5}, 400, "not in the 'char' tokenizer"),  # refused by the worker, not the schema
    (b'{"prompt": "to", ', 400, "not valid JSON"),
    # in range for the schema's types but past what decoding takes: refused before they can join a batch
    ({"prompt": "to", "seed": 2**64}, 400, "seed"),
    ({"prompt": "to", "temperature": 1e-300}, 400, "temperature must be 0 (greedy) or at least"),
    ({"prompt": "to", "top_p": 0}, 400, "top_p"),
    ({"prompt": "to", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"prompt": "to", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be up to 4"),
    ({"prompt": "to", "stop": "x" * 100_000}, 400, "at most 256 characters"),
    ({"prompt": "to", "max_tokens": 5000}, 400, "cap of 4096"),
    ({"prompt": "to " * 9000}, 400, "over this server's limit of 8192"),
    (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "1048576-byte limit"),
    ({"prompt": "to", "seed": -(2**63) - 1}, 400, "seed"),
]


@pytest.mark.parametrize("body, status, words", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_a_bad_request_gets_its_4xx_and_the_next_one_succeeds(server, client, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, text = post(server[1] + "/v1/completions", content)
    assert got == status
    error = json.loads(text)["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt="to", max_tokens=3, temperature=0).choices[0].text


def test_the_openai_client_raises_bad_request_for_a_refused_request_in_a_batch_of_good_ones(client):
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(client.completions.create, model="tiny", prompt="to", max_tokens=5, temperature=0)
                for _ in range(2)]
        bad = pool.submit(client.completions.create, model="tiny", prompt="XYZ", max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError, match="not in the 'char' tokenizer"):
        bad.result()
    assert all(len(future.result().choices[0].text) == 5 for future in good)
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        client.completions.create(model="tiny", prompt="to", extra_body={"beams": 2})


def test_sigterm_finishes_the_request_in_flight_then_exits(server, client):
    """Last: it stops the module's server. The steps wait on the server's state (the first chunk, /health turning
    503), not on the decoding's speed; the streamed request is long enough to be in flight throughout."""
    process, url = server
    stream = client.completions.create(model="tiny", prompt="to", max_tokens=3000, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # the request is being decoded now
    queued = {}
    behind = threading.Thread(target=lambda: queued.update(r=client.completions.create(
        model="tiny", prompt="to", max_tokens=4, temperature=0)))
    behind.start()  # waits in LitServe's queue for the streaming request's batch to end
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while healthy(url):  # the drain begins: /health answers 503, so a load balancer stops sending here
        assert time.monotonic() < deadline, "/health still says ok 10 s after SIGTERM"
        time.sleep(0.02)
    began = time.monotonic()  # a request that arrives during the drain: a quick 503, not a hang
    status, text = post(url + "/v1/completions", json.dumps({"prompt": "to", "max_tokens": 2}).encode())
    assert status == 503 and "shutting down" in json.loads(text)["error"]["message"]
    assert time.monotonic() - began < 5
    rest = list(chunks)
    behind.join(timeout=60)
    assert len(first.choices[0].text + "".join(chunk.choices[0].text for chunk in rest)) == 3000
    assert rest[-1].choices[0].finish_reason == "length"
    assert len(queued["r"].choices[0].text) == 4
    assert process.wait(timeout=60) == 0
    assert not healthy(url)


def worker_answers(api, requests: dict) -> dict:
    """Drives the worker as LitServe's loop does: each request's messages, once every one has ended."""
    from litserve.utils import LitAPIStatus

    from picogpt_lightning.commands.serve_requests import CompletionRequest

    for uid, body in requests.items():
        api.add_request(uid, CompletionRequest(**body).model_dump())
    messages, ended = {uid: [] for uid in requests}, set()
    while api.has_active_requests():
        for output in api.step():
            if output.status == LitAPIStatus.FINISH_STREAMING:
                ended.add(output.uid)
            else:
                messages[output.uid].append(output.output)
    assert ended == set(requests)
    return messages


def text_of(messages: list) -> str:
    return "".join(delta for message in messages for _, delta, _ in message["choices"])


def test_a_fault_while_admitting_fails_that_request_alone_and_one_in_the_shared_step_fails_the_running_ones(
    checkpoint, capsys, monkeypatch
):
    """A fault (a bug, not a bad request) in one request's prefill is its 500 alone, the one beside it decodes as it
    would alone; a fault in the step shared by all fails those running with a 500, and the next request decodes."""
    from picogpt_lightning.commands.serve_requests import CompletionRequest
    from picogpt_lightning.commands.serve_worker import CompletionsAPI

    expected = generated(capsys, checkpoint, "to", 12)
    api = CompletionsAPI(checkpoint, "cpu", False, spec=None)
    api.setup("cpu")
    admit_many = api.batch.admit_many

    def admit_failing_for_be(requests):
        if [api.tokenizer.encode("be", add_special_tokens=True)] in [prompts for prompts, *_ in requests]:
            raise RuntimeError("a fault in this request's prefill")
        return admit_many(requests)

    monkeypatch.setattr(api.batch, "admit_many", admit_failing_for_be)
    answers = worker_answers(api, {"good": dict(prompt="to", max_tokens=12, temperature=0),
                                   "bad": dict(prompt="be", max_tokens=12, temperature=0.5, seed=1)})
    assert [message["error"]["status"] for message in answers["bad"]] == [500]
    assert text_of(answers["good"]) == expected

    step = api.batch.decode_step
    monkeypatch.setattr(api.batch, "decode_step", lambda *args: 1 / 0)
    answers = worker_answers(api, {"a": dict(prompt="to", max_tokens=5, temperature=0),
                                   "b": dict(prompt="t", max_tokens=5, temperature=0)})
    assert all(messages[-1]["error"]["status"] == 500 for messages in answers.values())
    monkeypatch.setattr(api.batch, "decode_step", step)
    assert not api.batch.busy()  # the failed requests' rows are free again
    api.add_request("d", CompletionRequest(prompt="to", max_tokens=5, temperature=0).model_dump())
    api.step()
    assert api.batch.busy()
    api.reset()  # what the loop does after a fault it cannot place: every row is free, nothing is remembered
    assert not api.batch.busy() and not api.has_active_requests()
    assert text_of(worker_answers(api, {"c": dict(prompt="to", max_tokens=12, temperature=0)})["c"]) == expected


def test_a_request_generation_refuses_in_an_admission_gets_its_400_and_the_others_decode(checkpoint, capsys):
    """Rows of 8 positions: a prompt of 2 + 20 tokens cannot fit (generation's check, in the worker), the 2 + 5 beside
    it can; admitted at the same step, the first gets its 400 alone and the second generate's text."""
    from picogpt_lightning.commands.serve_worker import CompletionsAPI

    api = CompletionsAPI(checkpoint, "cpu", False, spec=None, max_length=8)
    api.setup("cpu")
    answers = worker_answers(api, {"long": dict(prompt="to", max_tokens=20, temperature=0),
                                   "short": dict(prompt="to", max_tokens=5, temperature=0)})
    assert [message["error"]["status"] for message in answers["long"]] == [400]
    assert "this batch's rows hold 8" in answers["long"][0]["error"]["message"]
    assert text_of(answers["short"]) == generated(capsys, checkpoint, "to", 5)
