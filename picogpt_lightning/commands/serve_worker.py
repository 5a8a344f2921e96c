"""The inference side of `serve`: a LitAPI that decodes every request in one continuous batch.

LitServe's continuous-batching loop (serve_loop.py) hands each request to `add_request` as it
arrives and calls `step` while any is active. A step takes the new requests in, admits those
that fit into the batch's free rows (their prompts prefilled, their first tokens chosen),
decodes one token for every running row (`generation/continuous.py`), and returns each
request's new text as one message: a request joins the running batch at the next step and
leaves it as soon as its rows are done, never waiting for a longer one ahead of it. Each request
keeps `generate`'s rules for its own tokens (a seed decides its samples whatever runs beside it).
"""

import queue
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import litserve as ls
import torch
from transformers import GenerationConfig
from litserve.loops.continuous_batching_loop import Output
from litserve.utils import LitAPIStatus

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.serve_loop import JoiningLoop
from picogpt_lightning.errors import UserError, first_line
from picogpt_lightning.generation import decode_step_for, resolve_generation_config
from picogpt_lightning.generation.continuous import Admitted, ContinuousBatch
from picogpt_lightning.generation.text import IncrementalText
from picogpt_lightning.tokenizer import Tokenizer

MAX_REMEMBERED_DEPARTURES = 4096


def load_model(ckpt: str, device: torch.device):
    checkpoint = checkpoints.load(ckpt)  # read once: weights, config and tokenizer
    return PicoGPT.from_checkpoint(checkpoint).eval().to(device), Tokenizer.from_checkpoint(checkpoint)


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


@dataclass(eq=False)
class Job:
    """One HTTP request in the worker: its rows (every prompt x n), its sampling settings, its tokens."""

    uid: str  # LitServe's id, which is also the API server's: by it a client's leaving is told
    rows: List[Row]
    prompts: List[List[int]]  # the token ids of each prompt
    n: int
    settings: dict
    seed: Optional[int]
    error: Optional[str] = None
    config: Optional[GenerationConfig] = None  # generate's settings, made when it is admitted
    admitted: Optional[Admitted] = None  # its rows in the batch, once it has them
    reported: bool = False

    @classmethod
    def from_request(cls, uid: str, request: dict, tokenizer: Tokenizer) -> "Job":
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
        job = cls(uid, rows, [], request["n"], settings, request["seed"] if not greedy else None)
        try:  # a prompt the tokenizer cannot encode is this request's error, not the batch's
            job.prompts = [tokenizer.encode(prompt, add_special_tokens=True) for prompt in prompts]
        except UserError as error:
            job.error = first_line(error)
        return job

    def message(self, choices: list) -> Optional[dict]:
        """This step's message for the API server (None: nothing new), with the usage once every row is done."""
        if self.reported:
            return None
        message = {"choices": choices}
        if self.done():
            self.reported = True
            prompt_tokens = sum(len(ids) for ids in self.prompts)
            completion = sum(len(row.ids) for row in self.rows)
            message["usage"] = dict(
                prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
            )
        return message if choices or "usage" in message else None

    def done(self) -> bool:
        return all(row.finish_reason for row in self.rows)

    def failure(self, text: str, status: int = 400) -> dict:
        self.reported = True
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": text, "type": kind, "param": None, "code": None, "status": status}}


class CompletionsAPI(ls.LitAPI):
    """Loads the checkpoint in the worker (`setup`); LitServe's continuous-batching loop then calls
    `add_request` for each arrival and `step` while `has_active_requests`."""

    def __init__(self, ckpt: str, device: str, compile: bool, spec, cancellations=None, max_batch_size: int = 16,
                 max_length: Optional[int] = None):
        super().__init__(spec=spec, max_batch_size=max_batch_size, loop=JoiningLoop())
        self.ckpt, self.device_name, self.compile = ckpt, device, compile
        self.max_length = max_length  # the longest prompt + max_tokens the API server lets through
        self.cancellations, self.gone = cancellations, {}  # requests whose clients left, as the API server says
        self.arrivals = deque()  # (uid, request) from the loop's thread, taken by the decoding thread
        self.waiting: deque = deque()  # jobs waiting for free rows, first come first admitted
        self.running: Dict[Admitted, Job] = {}

    def setup(self, device) -> None:
        # LitServe names a device per worker; --device already chose (and checked) the exact one
        self.model, self.tokenizer = load_model(self.ckpt, torch.device(self.device_name))
        config = resolve_generation_config(cache_implementation="static", disable_compile=not self.compile)
        step = decode_step_for(config, self.model.lm_head.weight.device)  # one graph per power-of-two row count
        self.batch = ContinuousBatch(self.model, self.max_batch_size, step, self.max_length)
        # every step runs on this one thread (compiled steps and CUDA graphs are kept per thread)
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        if self.compile:  # every row count's graph now, on that thread: /health says ok once steps run at full speed
            rounds = 3 if getattr(step, "cuda_graphs", False) else 1
            self.decoder.submit(self.warm_up, rounds).result()

    def warm_up(self, rounds: int) -> None:
        with torch.inference_mode():
            self.batch.warm_up(rounds)

    # ---- what LitServe's continuous-batching loop calls ------------------------------------------------

    def add_request(self, uid: str, request: dict) -> None:
        self.arrivals.append((uid, request))

    def has_capacity(self) -> bool:
        """Whether the loop may hand over another request now (else LitServe keeps it pending)."""
        return len(self.arrivals) + len(self.waiting) < self.max_batch_size

    def has_active_requests(self) -> bool:
        return bool(self.arrivals or self.waiting or self.running)

    def step(self, previous_outputs=None) -> List[Output]:
        """One step of the batch: arrivals taken in, departed clients' rows freed, waiting requests admitted,
        one token decoded for every running row. Returns the messages for the API server."""
        outputs: List[Output] = []
        with torch.inference_mode():
            self.take_arrivals(outputs)
            self.drop_departed(outputs)
            self.admit_waiting(outputs)
            if self.running:
                self.decode_one_token(outputs)
        return outputs

    def reset(self) -> None:
        """Forgets every request (after a failed step, whose requests LitServe has answered 500)."""
        self.batch.reset()
        self.arrivals.clear()
        self.waiting.clear()
        self.running.clear()

    def encode_response(self, output, **kwargs):
        return output  # already the API server's message; LitServe writes a dict as JSON

    # ---- the steps -----------------------------------------------------------------------------------

    def take_arrivals(self, outputs: List[Output]) -> None:
        while self.arrivals:
            uid, request = self.arrivals.popleft()
            job = Job.from_request(uid, request, self.tokenizer)
            if job.error is None and len(job.rows) > self.batch.capacity:
                job.error = (f"this request asks for {len(job.rows)} sequences (prompts x n); the server decodes at "
                             f"most {self.batch.capacity} at once (--max_batch_size): send fewer prompts or a smaller n")
            if job.error is not None:
                self.finish(job, outputs, job.failure(job.error))
            else:
                self.waiting.append(job)

    def drop_departed(self, outputs: List[Output]) -> None:
        """A client that left (or timed out) frees its rows at once; nobody reads what they would make."""
        gone = self.departed()
        if not gone:
            return
        for job in [job for job in self.waiting if job.uid in gone]:
            self.waiting.remove(job)
            self.finish(job, outputs, None)
        for job in [job for job in self.running.values() if job.uid in gone]:
            self.finish(job, outputs, None)

    def admit_waiting(self, outputs: List[Output]) -> None:
        """Admits the waiting requests in order while their rows fit (one that does not fit waits for the next),
        their prompts prefilled together."""
        admitted, free = [], self.batch.free_rows()
        while self.waiting and len(self.waiting[0].rows) <= free:
            job = self.waiting.popleft()
            job.config = resolve_generation_config(max_new_tokens=job.rows[0].max_tokens, **job.settings)
            admitted.append(job)
            free -= len(job.rows)
        if admitted:
            self.admit_together(admitted, outputs)

    def admit_together(self, jobs: List[Job], outputs: List[Output]) -> None:
        """One admission for all; if it fails (generation's checks refuse a request, or a prefill faults), each is
        admitted alone, so that only the request at fault fails: 400 for a refusal, 500 for a fault."""
        try:
            started = self.batch.admit_many([(job.prompts, job.n, job.config, job.seed) for job in jobs])
        except Exception as error:  # noqa: BLE001 - answered below, to the one request it belongs to
            if len(jobs) > 1:
                for job in jobs:
                    self.admit_together([job], outputs)
            elif isinstance(error, UserError):
                self.finish(jobs[0], outputs, jobs[0].failure(first_line(error)))
            else:
                traceback.print_exc()  # the cause, in the server's log
                failure = jobs[0].failure("internal error while generating; see the server's log", 500)
                self.finish(jobs[0], outputs, failure)
            return
        for job, (admitted, _) in zip(jobs, started):
            job.admitted = admitted
            self.running[admitted] = job
        for job, (_, tokens) in zip(jobs, started):
            self.send_tokens(job, tokens, outputs)

    def decode_one_token(self, outputs: List[Output]) -> None:
        try:
            stepped = self.batch.step()
        except Exception:  # noqa: BLE001 - a failure in the shared step: every running request fails, the server goes on
            traceback.print_exc()
            for job in list(self.running.values()):
                self.finish(job, outputs, job.failure("internal error while generating; see the server's log", 500))
            return
        for admitted, tokens in stepped:
            self.send_tokens(self.running[admitted], tokens, outputs)

    def send_tokens(self, job: Job, tokens: List[int], outputs: List[Output]) -> None:
        """Each row's new token becomes text; the request's message for this step, and its end once all are done."""
        eos = self.tokenizer.eos_token_id
        choices = []
        for row, token in zip(job.rows, tokens):
            if row.finish_reason is None:
                delta = row.add(token, self.tokenizer, eos)
                if delta or row.finish_reason:
                    choices.append([row.index, delta, row.finish_reason])
        message = job.message(choices)
        if job.done():
            self.finish(job, outputs, message)
        elif message is not None:
            outputs.append(Output(job.uid, message, LitAPIStatus.OK))

    def finish(self, job: Job, outputs: List[Output], last_message: Optional[dict]) -> None:
        """The request's last message (None: nobody is reading), its rows freed, and LitServe told it ended."""
        self.gone.pop(job.uid, None)  # a departure is remembered until its request ends
        if job.admitted is not None:
            self.batch.release(job.admitted)
            self.running.pop(job.admitted, None)
        if last_message is not None:
            outputs.append(Output(job.uid, last_message, LitAPIStatus.OK))
        outputs.append(Output(job.uid, None, LitAPIStatus.FINISH_STREAMING))

    def departed(self) -> set:
        """The requests whose clients have left, as far as the API server has said (read without waiting)."""
        while self.cancellations is not None:
            try:
                self.gone[self.cancellations.get_nowait()] = None
            except queue.Empty:
                break
        while len(self.gone) > MAX_REMEMBERED_DEPARTURES:  # ended requests' are dropped at once: these never came
            del self.gone[next(iter(self.gone))]
        return self.gone.keys()
