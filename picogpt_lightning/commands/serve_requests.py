"""What `serve` accepts: OpenAI's completion and chat completion requests, checked in full before they queue.

A chat request is answered as a completion: its conversation rendered by the tokenizer's chat
template becomes one prompt (`as_completion`), with the same limits, validation and errors; only
the request and response shapes differ (`messages` in, `message` / `delta` out).
"""

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from picogpt_lightning.errors import UserError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt far longer than any block_size here, far short of a memory problem
MAX_TOKENS_LIMIT = 4096
MAX_CHOICES = 64  # prompts x n: the rows one request may add to a batch
UNSUPPORTED = {  # OpenAI parameters this server knows but does not implement: refused unless left at their no-op value
    "suffix": None, "logprobs": None, "best_of": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completion request, plus generate's own sampling parameters (top_k, repetition_penalty)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None  # any name is accepted; the response names the served checkpoint
    prompt: Union[str, List[str]]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy, as in OpenAI's API
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    echo: bool = False
    user: Optional[str] = None  # accepted and ignored, as a single-user server may
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    logit_bias: Optional[dict] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("prompt")
    @classmethod
    def prompts_not_empty(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or any(text == "" for text in prompts):
            raise ValueError("must be a non-empty string (or a list of them): give at least one character to continue")
        return prompt

    @field_validator("stop")
    @classmethod
    def stops_are_few_and_not_empty(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(text == "" for text in stops):
            raise ValueError("must be up to 4 non-empty strings")
        return stop

    @field_validator(*UNSUPPORTED)
    @classmethod
    def only_implemented_options(cls, value, info: ValidationInfo):
        if value not in (None, UNSUPPORTED[info.field_name]):
            raise ValueError("is not supported by this server; leave it out")
        return value

    @model_validator(mode="after")
    def few_enough_choices(self):
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n = {len(self.prompts) * self.n} exceeds {MAX_CHOICES}; send fewer at once")
        return self

    @property
    def prompts(self) -> List[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)



CHAT_UNSUPPORTED = {  # known to OpenAI's chat API, not implemented here: refused unless at their no-op value
    "logprobs": False, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
    "tools": None, "tool_choice": None, "response_format": None,
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None  # accepted and ignored


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, plus generate's own sampling parameters (top_k, repetition_penalty)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[dict] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None

    @field_validator(*CHAT_UNSUPPORTED)
    @classmethod
    def only_implemented_options(cls, value, info: ValidationInfo):
        if value not in (None, CHAT_UNSUPPORTED[info.field_name]):
            raise ValueError("is not supported by this server; leave it out")
        return value

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
    fields = chat.model_dump(include=set(CompletionRequest.model_fields) - {"max_tokens", "logprobs", "logit_bias"})
    limit = chat.max_completion_tokens or chat.max_tokens
    return CompletionRequest(prompt=prompt, **fields, **({"max_tokens": limit} if limit else {}))
