"""What `serve` accepts: OpenAI's completion and chat completion requests, checked in full before they queue.

A chat request is answered as a completion: its conversation rendered by the tokenizer's chat
template becomes one prompt (`as_completion`), with the same limits, validation and errors; only
the request and response shapes differ (`messages` in, `message` / `delta` out).
"""

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from picogpt_lightning.generation.settings import SEED_RANGE
from picogpt_lightning.errors import UserError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt far longer than any block_size here, far short of a memory problem
MAX_TOKENS_LIMIT = 1 << 16  # the schema's ceiling; --max_tokens_cap (4096) is the server's own
MAX_CHOICES = 64  # prompts x n: the rows one request may add to a batch (the worker also caps it at its rows)
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's 4 stop strings; each matched against the text's tail at every token
MIN_TEMPERATURE = 1e-4  # below it logits / temperature leave float32's range; 0 asks for greedy decoding
MIN_TOP_P = 1e-6
PENALTY_RANGE = (1e-3, 1e3)  # repetition_penalty divides or multiplies logits by it
UNSUPPORTED = {  # OpenAI parameters this server knows but does not implement: refused unless left at their no-op value
    "suffix": None, "logprobs": None, "best_of": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
}
CHAT_UNSUPPORTED = {  # the same for the chat API
    "logprobs": False, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
    "tools": None, "tool_choice": None, "response_format": None,
}


def no_op_only(table: dict):
    """A validator refusing each field of `table` unless it is None or its no-op value there."""

    def check(cls, value, info: ValidationInfo):
        if value not in (None, table[info.field_name]):
            raise ValueError("is not supported by this server; leave it out")
        return value

    return field_validator(*table)(classmethod(check))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """What both APIs share: OpenAI's sampling and streaming fields, plus generate's top_k and repetition_penalty,
    each bounded so that no value can fail in the worker, where it would fail its batch-mates too."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None  # any name is accepted; the response names the served checkpoint
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy, as in OpenAI's API
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # 0: no top-k
    repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: Optional[str] = None  # accepted and ignored, as a single-user server may
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None

    @field_validator("temperature")
    @classmethod
    def greedy_or_representable(cls, temperature):
        if 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: smaller values overflow the logits")
        return temperature

    @field_validator("stop")
    @classmethod
    def stops_are_few_short_and_not_empty(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(text) <= MAX_STOP_CHARS for text in stops):
            raise ValueError(f"must be up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stop


class CompletionRequest(Sampling):
    """OpenAI's completion request."""

    prompt: Union[str, List[str]]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def prompts_not_empty(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or any(text == "" for text in prompts):
            raise ValueError("must be a non-empty string (or a list of them): give at least one character to continue")
        return prompt

    only_implemented_options = no_op_only(UNSUPPORTED)

    @model_validator(mode="after")
    def few_enough_choices(self):
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n = {len(self.prompts) * self.n} exceeds {MAX_CHOICES}; send fewer at once")
        return self

    @property
    def prompts(self) -> List[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)  # an empty turn: most likely a client's bug, as an empty prompt is
    name: Optional[str] = None  # accepted and ignored


class ChatRequest(Sampling):
    """OpenAI's chat completion request."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # the newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None

    only_implemented_options = no_op_only(CHAT_UNSUPPORTED)

    @model_validator(mode="after")
    def one_length_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self


def as_completion(chat: ChatRequest, tokenizer) -> CompletionRequest:
    """The completion request that continues the rendered conversation with the assistant's turn."""
    messages = [{"role": message.role, "content": message.content} for message in chat.messages]
    try:
        prompt = tokenizer.chat_prompt(messages)
    except UserError as error:
        raise ValueError(str(error)) from None
    fields = chat.model_dump(include=set(Sampling.model_fields) - {"logit_bias"})
    limit = chat.max_completion_tokens or chat.max_tokens
    return CompletionRequest(prompt=prompt, **fields, **({"max_tokens": limit} if limit else {}))
