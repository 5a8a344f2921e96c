"""`python -m picogpt_lightning serve`: a checkpoint behind OpenAI's `/v1/completions` and `/v1/chat/completions`,
through LitServe.

LitServe runs the pieces: an API server process (FastAPI + uvicorn) that validates each
request (serve_api.py) and queues it, and an inference worker process that loads the
checkpoint and decodes every request in flight as one continuous batch (serve_worker.py,
serve_loop.py). What LitServe leaves to
its caller is here: checking the flags, OpenAI's error shape for FastAPI's errors, and a
SIGTERM that lets the requests in flight finish (serve_lifecycle.py; LitServe's own handling of
SIGTERM is Python's default: the main process dies at once and its workers with it).
"""

import multiprocessing
import os
import socket
from pathlib import Path
from typing import Literal, Optional

from picogpt_lightning.commands.generate import check_device
from picogpt_lightning.errors import InputNotFound, UserError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the interfaces LitServe binds to


def serve(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_batch_size: int = 16,
    compile: Optional[bool] = None,
    queue_timeout: float = 120.0,
    model_name: Optional[str] = None,
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info",
    max_prompt_tokens: int = 8192,
    max_tokens_cap: int = 4096,
    api_key: Optional[str] = None,
    schema_pages: bool = False,
) -> None:
    """Serve a checkpoint over HTTP with OpenAI's completions and chat APIs (POST /v1/completions and
    /v1/chat/completions, the conversation rendered by the tokenizer's chat template), through LitServe.

    Args:
        ckpt: a checkpoint written by training (it holds the model config and the tokenizer), or a Hugging Face
            Llama-family model folder.
        host: the interface to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface).
        port: the TCP port, 1024 to 65535.
        device: "cpu", "cuda" or any torch device to decode on.
        max_batch_size: the most sequences decoded at once (every prompt x n of the requests in flight); a request
            joins the running batch at its next step when rows are free, else waits for a running one to end.
        compile: compile the decode step (torch.compile); default: on CUDA only (on CPU a batch shape compiles for seconds).
        queue_timeout: seconds a request may wait for its first token before it is answered 504.
        model_name: the name responses give as "model" (default: the checkpoint's file name).
        log_level: uvicorn's and LitServe's log level: debug, info, warning, error.
        max_prompt_tokens, max_tokens_cap: the longest prompt, in tokens, and the most max_tokens a request may ask
            for (a 400 past either).
        api_key: a key each /v1 request must send as `Authorization: Bearer KEY` (else 401); default: PICOGPT_API_KEY.
        schema_pages: also serve FastAPI's /docs, /redoc and /openapi.json.
    """
    import litserve as ls

    from picogpt_lightning.commands.serve_lifecycle import Drain, run_until_stopped
    from picogpt_lightning.commands.serve_api import MAX_BODY_BYTES, CompletionsSpec, Limits
    from picogpt_lightning.commands.serve_worker import CompletionsAPI, load_model

    torch_device = check_flags(ckpt, host, port, device, max_batch_size, queue_timeout)
    limits = Limits(check_positive("max_prompt_tokens", max_prompt_tokens), check_positive("max_tokens_cap", max_tokens_cap),
                    queue_timeout)
    _, tokenizer = load_model(ckpt, "cpu")  # a bad checkpoint gets its one-line error here, not a worker's traceback
    compile = torch_device.type == "cuda" if compile is None else compile
    name = model_name or Path(ckpt).name
    cancellations = multiprocessing.get_context("spawn").Queue()  # API server -> worker: requests whose client left
    spec = CompletionsSpec(name, tokenizer.to_dict(), limits, cancellations)
    api = CompletionsAPI(ckpt, str(torch_device), compile, spec, cancellations, max_batch_size=max_batch_size,
                         max_length=limits.max_prompt_tokens + limits.max_tokens_cap)
    server = ls.LitServer(
        api, accelerator="cuda" if torch_device.type == "cuda" else "cpu", devices=1, timeout=queue_timeout,
        max_payload_size=MAX_BODY_BYTES,
    )
    drain = Drain()
    configure_app(server.app, api_key, host, schema_pages, drain)
    print(f"serving {name} at http://{host}:{port}/v1/completions and /v1/chat/completions", flush=True)
    run_until_stopped(server, drain, host=host, port=port, log_level=log_level, generate_client_file=False)

def configure_app(app, api_key: Optional[str], host: str, schema_pages: bool, drain) -> None:
    """OpenAI's error shape for FastAPI's own errors (400 for a bad body), the API key, the schema pages, and a
    503 for requests that arrive while the server drains."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from picogpt_lightning.commands.serve_access import guard, resolve_api_key
    from picogpt_lightning.commands.serve_api import http_error, invalid_request
    from picogpt_lightning.commands.serve_lifecycle import DrainGate

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    guard(app, resolve_api_key(api_key), host, schema_pages)
    app.add_middleware(DrainGate, drain=drain)


def check_flags(ckpt, host, port, device, max_batch_size, queue_timeout):
    """The torch device to decode on, once every flag is one LitServe accepts (its own errors are tracebacks)."""
    if not os.path.exists(ckpt):
        raise InputNotFound(f"--ckpt {ckpt}: no such file; pass a checkpoint written by training or a Hugging Face model folder")
    if host not in HOSTS:
        raise UserError(f"--host {host!r}: LitServe listens on one of {', '.join(HOSTS)}; use 127.0.0.1 for this machine only")
    if not isinstance(port, int) or not 1024 <= port <= 65535:
        raise UserError(f"--port {port}: pick a port from 1024 to 65535")
    check_port_free(host, port)
    if max_batch_size < 1:
        raise UserError(f"--max_batch_size {max_batch_size}: must be at least 1 (1: no batching)")
    if not queue_timeout > 0:
        raise UserError(f"--queue_timeout {queue_timeout}: must be a positive number of seconds")
    return check_device(device)


def check_positive(flag: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--{flag} {value!r}: must be a positive number of tokens")
    return value


def check_port_free(host: str, port: int) -> None:
    """uvicorn's answer to a taken port is a log line after the workers have started; this is one line before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}); pick another port") from None


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(serve, as_positional=False)
