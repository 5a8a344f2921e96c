"""The inference side of `serve`: a LitAPI that decodes a LitServe batch of completion requests together.

LitServe's batched streaming loop hands `predict` the requests that arrived within
batch_timeout (up to max_batch_size) and sends each step's list of outputs, one per
request, back to the API server. Requests with the same sampling settings are one group,
its rows (every prompt x n of every request) left-padded into one `model.generate(...,
cache_implementation="static")`; groups with different settings run one after the other,
never with each other's settings, and a request with a seed runs alone, so that its seed
alone decides its samples. `model.generate` calls back a streamer and does not yield, so
it runs in one long-lived decoding thread (one thread, so compiled CUDA graphs are
reused) and `predict` yields what that thread's streamer queues.
"""

import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import List, Optional

import litserve as ls
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.errors import UserError, first_line
from picogpt_lightning.generation import encode_prompts, resolve_generation_config
from picogpt_lightning.generation.text import IncrementalText
from picogpt_lightning.tokenizer import Tokenizer

FINISHED = "finished"  # what the decoding thread queues after a batch's last step


def load_model(ckpt: str, device: torch.device):
    checkpoint = checkpoints.load(ckpt)  # read once: weights, config and tokenizer
    return PicoGPT.from_checkpoint(checkpoint).eval().to(device), Tokenizer.from_checkpoint(checkpoint)


MAX_REMEMBERED_DEPARTURES = 4096


class GroupFinished(Exception):
    """Raised by the streamer to end `model.generate` once every row has met its stop or max_tokens."""


@dataclass
class Row:
    """One choice of one request: the tokens it has, and how much of its text has been sent."""

    index: int  # the choice's index in the response (prompt number * n + sample number)
    prompt: str
    max_tokens: int
    stops: List[str]
    echo: str  # the prompt when echo=true: sent before the first token
    ids: List[int] = field(default_factory=list)
    sent: int = 0
    finish_reason: Optional[str] = None
    text: str = ""  # the whole text so far, complete characters only
    decoder: Optional[IncrementalText] = None

    def add(self, token: int, tokenizer: Tokenizer, eos: Optional[int]) -> str:
        """Takes the next token; returns the text it makes safe to send (held back while it could begin a stop).
        The work is constant per token: new tokens decoded incrementally, stops looked for in the new text only."""
        if self.decoder is None:
            self.decoder = IncrementalText(tokenizer)
        checked = len(self.text)
        if token == eos:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
        self.text += self.decoder.add([] if token == eos else [token], final=self.finish_reason is not None)
        longest = max(map(len, self.stops), default=0)
        start = max(0, checked - longest + 1)  # a stop may end in the new text yet begin in the old
        cuts = [cut for cut in (self.text.find(stop, start) for stop in self.stops) if cut >= 0]
        text = self.text
        if cuts:
            text, self.finish_reason = text[: min(cuts)], "stop"
        elif self.finish_reason is None and len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
            text = self.text = self.text + self.decoder.add([], final=True)
        end = len(text) if self.finish_reason else len(text) - self.held_back(text)
        delta, self.sent = self.echo + text[self.sent : max(end, self.sent)], max(end, self.sent)
        self.echo = ""
        return delta

    def held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still turn into a stop string."""
        return max([n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])], default=0)


@dataclass
class Job:
    """One HTTP request in the worker: its rows, its sampling settings and its position in the batch."""

    rows: List[Row]
    settings: dict
    seed: Optional[int]
    prompt_tokens: int
    request_id: Optional[str] = None  # the API server's id, by which a client's leaving is told
    error: Optional[str] = None
    position: int = 0
    reported: bool = False

    @classmethod
    def from_request(cls, request: dict, tokenizer: Tokenizer) -> "Job":
        prompts = [request["prompt"]] if isinstance(request["prompt"], str) else request["prompt"]
        stops = [request["stop"]] if isinstance(request["stop"], str) else list(request["stop"] or [])
        greedy = request["temperature"] == 0  # OpenAI's rule: temperature 0 is the most likely token
        settings = dict(do_sample=not greedy, repetition_penalty=request["repetition_penalty"])
        if not greedy:
            settings.update(
                temperature=request["temperature"], top_k=request["top_k"] or None,
                top_p=request["top_p"] if request["top_p"] < 1 else None,
            )
        rows = [
            Row(number * request["n"] + sample, prompt, request["max_tokens"], stops, prompt if request["echo"] else "")
            for number, prompt in enumerate(prompts) for sample in range(request["n"])
        ]
        job = cls(rows, settings, request["seed"] if not greedy else None, 0, request.get("request_id"))
        try:  # a prompt the tokenizer cannot encode is this request's error, not its batch's
            job.prompt_tokens = sum(len(tokenizer.encode(prompt, add_special_tokens=True)) for prompt in prompts)
        except UserError as error:
            job.error = first_line(error)
        return job

    def group_key(self) -> tuple:
        # a seeded request decodes alone: batched with others, its samples would depend on them
        return tuple(sorted(self.settings.items())) + ((("seed", self.seed, self.position),) if self.seed is not None else ())

    def message(self, choices: list) -> Optional[dict]:
        """This step's message for the API server (None: nothing new), with the usage once every row is done."""
        if self.reported:
            return None
        message = {"choices": choices}
        if all(row.finish_reason for row in self.rows):
            self.reported = True
            completion = sum(len(row.ids) for row in self.rows)
            message["usage"] = dict(
                prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                total_tokens=self.prompt_tokens + completion,
            )
        return message if choices or "usage" in message else None

    def failure(self, text: str, status: int = 400) -> dict:
        self.reported = True
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": text, "type": kind, "param": None, "code": None, "status": status}}


class RowStreamer:
    """transformers' streamer interface over a group's rows: each step's new tokens become each request's message."""

    def __init__(self, jobs: List[Job], batch_size: int, outbox: queue.Queue, tokenizer: Tokenizer, eos,
                 departed=lambda: ()):
        self.jobs, self.batch_size, self.outbox, self.tokenizer, self.eos = jobs, batch_size, outbox, tokenizer, eos
        self.rows = [(job, row) for job in jobs for row in job.rows]
        self.departed = departed  # the ids of requests whose clients have left

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() == 2:
            return  # the prompts, called once before the first step
        gone = self.departed()
        for job, row in self.rows:
            if job.request_id in gone and row.finish_reason is None:  # nobody reads it: decode no further
                row.finish_reason, job.reported = "cancelled", True
        choices = {id(job): [] for job in self.jobs}
        for (job, row), token in zip(self.rows, tokens.tolist()):  # rows past self.rows pad the batch: ignored
            if row.finish_reason is None:
                delta = row.add(token, self.tokenizer, self.eos)
                if delta or row.finish_reason:
                    choices[id(job)].append([row.index, delta, row.finish_reason])
        self.send(choices)
        if all(row.finish_reason for _, row in self.rows):
            raise GroupFinished

    def end(self) -> None:
        """After the last step: a row not yet done ran out of tokens."""
        choices = {id(job): [] for job in self.jobs}
        for job, row in self.rows:
            if row.finish_reason is None:
                row.finish_reason = "length"
                choices[id(job)].append([row.index, "", "length"])
        self.send(choices)

    def send(self, choices: dict) -> None:
        outputs = [None] * self.batch_size
        for job in self.jobs:
            outputs[job.position] = job.message(choices[id(job)])
        if any(output is not None for output in outputs):
            self.outbox.put(outputs)


class CompletionsAPI(ls.LitAPI):
    """Loads the checkpoint in the worker (`setup`) and decodes each batch LitServe collects (`predict`)."""

    def __init__(self, ckpt: str, device: str, compile: bool, spec, cancellations=None, **batching):
        super().__init__(spec=spec, **batching)
        self.ckpt, self.device_name, self.compile = ckpt, device, compile
        self.cancellations, self.gone = cancellations, {}  # requests whose clients left, as the API server says

    def setup(self, device) -> None:
        # LitServe names a device per worker; --device already chose (and checked) the exact one
        self.model, self.tokenizer = load_model(self.ckpt, torch.device(self.device_name))
        self.inbox = queue.Queue()
        threading.Thread(target=self.decode_forever, name="decode", daemon=True).start()

    def decode_request(self, request: dict, **kwargs) -> Job:
        return Job.from_request(request, self.tokenizer)

    def batch(self, jobs: List[Job]) -> List[Job]:
        for position, job in enumerate(jobs):
            job.position = position
        return list(jobs)

    def predict(self, jobs, **kwargs):
        single = isinstance(jobs, Job)  # --max_batch_size 1: LitServe hands over one request, not a batch
        outbox = queue.Queue()
        self.inbox.put(([jobs] if single else jobs, outbox))
        while (outputs := outbox.get()) is not FINISHED:
            if isinstance(outputs, BaseException):
                raise outputs  # a bug, not a bad request: LitServe answers 500 for this batch
            if single and outputs[0] is None:
                continue  # nothing for the one request this step
            yield outputs[0] if single else outputs

    def encode_response(self, outputs, **kwargs):
        yield from outputs  # already the API server's messages; LitServe writes dicts as JSON

    def decode_forever(self) -> None:
        while True:
            jobs, outbox = self.inbox.get()
            try:
                self.decode_batch(jobs, outbox)
            except BaseException as error:
                outbox.put(error)
            else:
                outbox.put(FINISHED)

    def decode_batch(self, jobs: List[Job], outbox: queue.Queue) -> None:
        refused = [job.failure(job.error) if job.error else None for job in jobs]
        if any(refused):
            outbox.put(refused)
        groups = {}
        for job in jobs:
            if job.error is None:
                groups.setdefault(job.group_key(), []).append(job)
        for group in groups.values():
            self.decode_group(group, len(jobs), outbox)

    def decode_group(self, group: List[Job], batch_size: int, outbox: queue.Queue) -> None:
        try:
            self.generate_rows(group, batch_size, outbox)
        except UserError as error:  # from generation's checks, before any token of the group
            if len(group) > 1:  # tell which requests are refused: each alone
                for job in group:
                    self.decode_group([job], batch_size, outbox)
                return
            outputs = [None] * batch_size
            outputs[group[0].position] = group[0].failure(first_line(error))
            outbox.put(outputs)
        except Exception:  # noqa: BLE001 - a failure while decoding: this group's requests fail, the others go on
            traceback.print_exc()  # the cause, in the server's log
            outputs = [None] * batch_size
            for job in group:
                if not job.reported:
                    outputs[job.position] = job.failure("internal error while generating; see the server's log", 500)
            outbox.put(outputs)

    def generate_rows(self, group: List[Job], batch_size: int, outbox: queue.Queue) -> None:
        prompts = [row.prompt for job in group for row in job.rows]
        max_tokens = max(row.max_tokens for job in group for row in job.rows)
        rows, max_new_tokens = self.compiled_shape(prompts, max_tokens)
        input_ids, attention_mask = encode_prompts(self.tokenizer, rows, self.model.lm_head.weight.device)
        config = resolve_generation_config(
            max_new_tokens=max_new_tokens, cache_implementation="static", disable_compile=not self.compile,
            **group[0].settings,
        )
        if group[0].seed is not None:
            torch.manual_seed(group[0].seed)
        eos = self.tokenizer.eos_token_id
        streamer = RowStreamer(group, batch_size, outbox, self.tokenizer, eos, self.departed)
        try:
            self.model.generate(
                input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer,
                eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
            )
        except GroupFinished:
            pass

    def departed(self) -> set:
        """The requests whose clients have left, as far as the API server has said (read without waiting)."""
        while self.cancellations is not None:
            try:
                self.gone[self.cancellations.get_nowait()] = None
            except queue.Empty:
                break
        while len(self.gone) > MAX_REMEMBERED_DEPARTURES:  # the oldest have long been decoded or dropped
            del self.gone[next(iter(self.gone))]
        return self.gone.keys()

    def compiled_shape(self, prompts: List[str], max_tokens: int):
        """Rows and max_new_tokens to decode with: when compiling, the batch padded to a power of two and the
        length rounded up to 32, so a few compiled graphs serve every request (the streamer stops at each
        row's own max_tokens and ignores padding rows); as asked otherwise."""
        if not self.compile:
            return prompts, max_tokens
        rows = prompts + prompts[-1:] * ((1 << (len(prompts) - 1).bit_length()) - len(prompts))
        prompt_length = max(len(self.tokenizer.encode(prompt, add_special_tokens=True)) for prompt in prompts)
        rounded = -(-(prompt_length + max_tokens) // 32) * 32 - prompt_length
        fits = prompt_length + rounded <= self.model.config.block_size
        return rows, rounded if fits else max_tokens
