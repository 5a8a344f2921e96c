"""`serve`'s /v1/chat/completions on a Hugging Face Llama folder: the `openai` client's chat completion is
what generate writes after the conversation rendered by the folder's own chat template. The server
requires an API key and has no schema pages."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from hf_folders import llama_folder
from picogpt_lightning import PicoGPT
from picogpt_lightning.data import Tokenizer
from picogpt_lightning.generation import generate_texts
from test_serve import free_port, healthy

KEY = "sesame"
MESSAGES = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus_path):
    return str(llama_folder(tmp_path_factory.mktemp("chat") / "model", corpus_path.read_text()[:200_000]))


def start_server(folder, *flags):
    """`serve --ckpt folder` on a free port, once healthy: (process, url)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "serve", "--ckpt", folder, "--port", str(port), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not healthy(url):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the server did not become healthy in 120 s"
        time.sleep(0.2)
    return process, url


@pytest.fixture(scope="module")
def client(folder):
    process, url = start_server(folder, "--log_level", "warning", "--api_key", KEY, "--max_prompt_tokens", "128")
    yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    process.terminate()
    process.wait(timeout=60)


def reference(folder, max_new_tokens: int) -> str:
    """generate's continuation of the rendered conversation (greedy, stopping at EOS)."""
    model, tokenizer = PicoGPT.from_checkpoint(folder).eval(), Tokenizer.from_checkpoint(folder)  # bf16, as served
    prompt = tokenizer.chat_prompt(MESSAGES)
    assert tokenizer.encode(prompt, add_special_tokens=True) == tokenizer.hf.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )  # the BOS the template writes is the one encoding adds: once
    text = generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, do_sample=False)[0]
    assert text.startswith(prompt)
    return text[len(prompt):]


def test_chat_completion_is_generate_on_the_rendered_template(client, folder):
    expected = reference(folder, 16)
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected and expected
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0, stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected


@pytest.mark.parametrize(
    "body, field",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_requests_are_a_400_naming_the_field(client, body, field):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="m", **body)
    assert field in str(error.value)


def test_without_the_key_a_401_and_no_schema_pages(client):
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="guess", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        stranger.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    root = str(client.base_url).removesuffix("/v1/")
    for page in ("/docs", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(root + page, timeout=10)
        assert error.value.code == 404
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 128"):  # --max_prompt_tokens
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "To be " * 200}], max_tokens=2)


@pytest.mark.parametrize("victim", ["worker", "api"])
def test_a_dead_process_stops_the_server_with_one_line_and_status_1(folder, victim):
    process, url = start_server(folder, "--log_level", "error")
    children = subprocess.run(["pgrep", "-P", str(process.pid), "-a"], capture_output=True, text=True).stdout.splitlines()
    # LitServe spawns the inference worker and forks the API server, last of its children
    workers = [int(line.split()[0]) for line in children if "spawn_main" in line]
    forks = [int(line.split()[0]) for line in children if "picogpt_lightning serve" in line]
    assert workers and forks, children
    os.kill(workers[0] if victim == "worker" else max(forks), signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    errors = [line for line in process.stderr.read().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "died" in errors[0]
    assert not healthy(url)


def test_queue_timeout_bounds_the_wait_and_a_client_that_leaves_frees_its_row(folder):
    """Behind a long request in a batch of one row, a request waits at most --queue_timeout, then gets a 504; once
    the long request's client leaves, its row is free for the next request at once (its decoding stopped)."""
    process, url = start_server(folder, "--log_level", "error", "--max_batch_size", "1", "--queue_timeout", "1")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        long = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4000, temperature=0, stream=True)
        next(iter(long))  # decoding: the only batch slot is taken
        began = time.monotonic()
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0)
        assert error.value.status_code == 504 and time.monotonic() - began < 30
        long.close()  # 4000 tokens would hold the row past the next request's --queue_timeout
        reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        process.terminate()
        process.wait(timeout=60)
