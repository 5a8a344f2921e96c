"""The HTTP side of `serve`: OpenAI's legacy `/v1/completions` as a LitServe spec, and
`/v1/chat/completions` beside it (serve_requests.py renders the conversation into a prompt).

LitServe's own `OpenAISpec` speaks only `/v1/chat/completions`; this spec is built the
same way (a `LitSpec` that registers its endpoint, puts each request on LitServe's queue
and reads the inference worker's messages back), for the completions API. Requests are
validated here, in the API server, before they reach the worker, which decodes every
request in flight in one batch: nothing malformed may get that far. Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

import asyncio
import json
import pickle
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.exceptions import HTTPException

from picogpt_lightning.commands.serve_requests import (  # noqa: F401 (MAX_BODY_BYTES: serve.py reads it here)
    MAX_BODY_BYTES, ChatRequest, CompletionRequest, as_completion,
)
from picogpt_lightning.errors import UserError, first_line

def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 list of pydantic errors, as OpenAI's 400 naming the first bad field."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    elif first.get("type") == "extra_forbidden":
        fields = ChatRequest.model_fields if request.url.path.endswith("/chat/completions") else CompletionRequest.model_fields
        known = ", ".join(sorted(fields))
        message = f"unknown parameter {param!r}; the parameters are: {known}"
    elif not location:
        message = f"the body must be a JSON object of completion parameters: {first.get('msg').removeprefix('Value error, ')}"
    elif first.get("type") == "value_error":  # this module's validators word their message to follow the name
        message = f"{param} {first.get('msg').removeprefix('Value error, ')}"
    else:
        message = f"{param}: {first.get('msg')}"
    return JSONResponse(error_body(message, param), status_code=400)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, LitServe's 413 for an oversize body) in OpenAI's shape."""
    detail = error.detail if error.status_code != 413 else f"the body is over the {MAX_BODY_BYTES}-byte limit"
    return JSONResponse(error_body(str(detail)), status_code=error.status_code, headers=error.headers)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the worker, checked before it is queued."""

    max_prompt_tokens: int = 8192
    max_tokens_cap: int = 4096
    queue_timeout: float = 120.0  # seconds a request may wait for its first token


class CompletionsSpec(LitSpec):
    """`POST /v1/completions`: one queued item per HTTP request, its choices decoded as rows of a batch.

    The worker sends, per request, messages `{"choices": [[index, text, finish_reason]...]}`,
    one with `"usage"` last, or a single `{"error": ...}` before any text; the first message
    is awaited before answering, so a request the worker refuses still gets a 400.
    """

    def __init__(self, model_name: str, tokenizer_dict: Optional[dict] = None, limits: Limits = Limits(),
                 cancellations=None):
        super().__init__()
        self.limits = limits
        self.cancellations = cancellations  # a multiprocessing queue: ids of requests whose client left
        self.api_path = "/v1/completions"
        self.model_name = model_name
        self.tokenizer_dict, self._tokenizer = tokenizer_dict, None  # the chat template's, built on first use
        self.add_endpoint(self.api_path, self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])

    @property
    def stream(self):
        return True  # the worker always streams; a non-streaming request is collected here

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def completions(self, request: CompletionRequest):
        return await self.answer(request, chat=False)

    async def chat_completions(self, request: ChatRequest):
        try:
            completion = as_completion(request, self.tokenizer)
        except ValueError as error:  # a conversation the template refuses, or a prompt out of bounds
            return JSONResponse(error_body(str(error).splitlines()[0], "messages"), status_code=400)
        return await self.answer(completion, chat=True)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from picogpt_lightning.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_dict(self.tokenizer_dict)
        return self._tokenizer

    async def answer(self, request: CompletionRequest, chat: bool):
        refusal = await self.over_limits(request)
        if refusal is not None:
            return refusal
        uid = uuid.uuid4().hex
        messages = self.worker_messages(uid, request)
        try:  # bounded here: LitServe itself checks a request's age only when the worker takes it
            first = await asyncio.wait_for(anext(messages), self.limits.queue_timeout)
        except asyncio.TimeoutError:
            await messages.aclose()  # the worker drops what it later makes for this request
            message = f"the request waited {self.limits.queue_timeout:g} s for the model without starting; try again"
            return JSONResponse(error_body(message, kind="server_error"), status_code=504)
        if "error" in first:
            await messages.aclose()
            return JSONResponse(first, status_code=first["error"].pop("status", 400))
        kind = ("chat.completion.chunk" if request.stream else "chat.completion") if chat else "text_completion"
        header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uid}", "object": kind, "created": int(time.time()),
                  "model": self.model_name}
        if request.stream:
            events = self.events(request, header, first, messages, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        body = await self.collect(request, header, first, messages, chat)
        return JSONResponse(body, status_code=body["error"].pop("status", 500) if "error" in body else 200)

    async def over_limits(self, request: CompletionRequest) -> Optional[JSONResponse]:
        """A 400 for a request past --max_tokens_cap or --max_prompt_tokens; None if it is within both."""
        if request.max_tokens > self.limits.max_tokens_cap:
            message = f"max_tokens {request.max_tokens} exceeds this server's cap of {self.limits.max_tokens_cap}"
            return JSONResponse(error_body(message, "max_tokens"), status_code=400)
        if self.tokenizer_dict is None:
            return None
        encode = self.tokenizer.encode_batch  # in a thread: a long prompt must not stall the other clients' streams
        try:
            lengths = [len(ids) for ids in await asyncio.to_thread(encode, request.prompts, True)]
        except UserError as error:  # a symbol the vocabulary lacks
            return JSONResponse(error_body(first_line(error), "prompt"), status_code=400)
        if max(lengths) > self.limits.max_prompt_tokens:
            message = (f"the prompt is {max(lengths)} tokens, over this server's limit of {self.limits.max_prompt_tokens}; "
                       "send a shorter one")
            return JSONResponse(error_body(message, "prompt"), status_code=400)
        return None

    async def worker_messages(self, uid: str, request: CompletionRequest):
        """The worker's messages for this request, decoded, ending with the one that holds the usage."""
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), {**request.model_dump(), "request_id": uid}))
        finished = False
        try:
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    yield worker_failure(data)
                    return
                if data is None:  # a step of the batch that had nothing for this request
                    continue
                message = json.loads(data)
                finished = "usage" in message or "error" in message
                yield message
                if finished:
                    return
            yield error_body("the inference worker stopped before finishing this request", kind="server_error")
        finally:
            self.response_buffer.pop(uid, None)  # later steps of the batch for this request are dropped
            if not finished and self.cancellations is not None:
                self.cancellations.put(uid)  # the client left (or timed out): the worker stops decoding it

    async def events(self, request: CompletionRequest, header: dict, first: dict, messages, chat: bool = False):
        """Server-sent events in OpenAI's format: text chunks, the optional usage chunk, `data: [DONE]`."""
        message, started = first, set()  # a chat stream's first delta of each choice names the role
        while True:
            if "error" in message:  # the worker broke mid-stream: the status line has gone, so the event says it
                message["error"].pop("status", None)
                yield f"data: {json.dumps(message)}\n\n"
                return
            if message["choices"]:
                choices = [chat_delta(*row, row[0] not in started) if chat else choice(*row) for row in message["choices"]]
                started.update(row[0] for row in message["choices"])
                yield f"data: {json.dumps({**header, 'choices': choices})}\n\n"
            if "usage" in message:
                break
            message = await anext(messages)
        if request.stream_options is not None and request.stream_options.include_usage:
            yield f"data: {json.dumps({**header, 'choices': [], 'usage': message['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    async def collect(self, request: CompletionRequest, header: dict, first: dict, messages, chat: bool = False) -> dict:
        texts, reasons = {}, {}
        message = first
        while True:
            if "error" in message:
                return message  # a failure after the first step: the worker itself broke (a 500)
            for index, text, finish_reason in message["choices"]:
                texts[index] = texts.get(index, "") + text
                reasons[index] = finish_reason or reasons.get(index)
            if "usage" in message:
                break
            message = await anext(messages)
        shape = chat_choice if chat else choice
        choices = [shape(index, texts[index], reasons[index]) for index in sorted(texts)]
        return {**header, "choices": choices, "usage": message["usage"]}


def choice(index: int, text: str, finish_reason: Optional[str]) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: Optional[str]) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, text: str, finish_reason: Optional[str], first: bool) -> dict:
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def worker_failure(data) -> dict:
    """LitServe's ERROR message (a pickled exception) as an OpenAI error: its 504 for a request
    that waited too long in the queue, otherwise a 500 whose cause is in the server's log."""
    try:
        error = pickle.loads(data) if isinstance(data, bytes) else data
    except Exception:
        error = None
    status = getattr(error, "status_code", 500)
    message = str(getattr(error, "detail", "")) or "internal error while generating; see the server's log"
    body = error_body(message, kind="server_error" if status >= 500 else "invalid_request_error")
    body["error"]["status"] = status
    return body

