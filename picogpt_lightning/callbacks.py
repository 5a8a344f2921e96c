"""Lightning callbacks this project needs and Lightning lacks."""

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from picogpt_lightning.model.generation import resolve_generation_config
from picogpt_lightning.text_generation import encode_prompts, generate_texts

SAMPLING = {"do_sample": True, "temperature": 0.8}  # what samples use unless `generation` says otherwise


class SampleGenerationCallback(Callback):
    """After each validation, continues fixed prompts and writes the text to TensorBoard.

    The same seed every time, so samples from successive validations differ only because
    the model has changed. Generation runs on every rank (a sharded model needs all of
    them for a forward pass); only rank zero writes. Training's random state is untouched.

    `generation` holds any further `transformers.GenerationConfig` fields (default: sampling at
    temperature 0.8). In a config: trainer.callbacks: [{class_path:
    picogpt_lightning.callbacks.SampleGenerationCallback, init_args: {prompts: ["ROMEO:"],
    max_new_tokens: 100, generation: {top_k: 40}}}]
    """

    def __init__(
        self,
        prompts: Optional[List[str]] = None,
        max_new_tokens: int = 100,
        seed: int = 1337,
        generation: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.prompts = list(prompts) if prompts else ["\n"]
        if max_new_tokens < 1:
            raise ValueError(f"SampleGenerationCallback.max_new_tokens must be >= 1, got {max_new_tokens}")
        options = {**SAMPLING, **(generation or {}), "max_new_tokens": max_new_tokens}
        self.generation_config = resolve_generation_config(**options)
        self.seed = seed

    def on_fit_start(self, trainer, pl_module) -> None:
        # checked here, once the module has its tokenizer, so a bad setting fails before training, not after
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "SampleGenerationCallback needs the module's tokenizer; train with a datamodule that has one"
            )
        input_ids, _ = encode_prompts(tokenizer, self.prompts)
        block_size = pl_module.model.config.block_size
        max_new_tokens = self.generation_config.max_new_tokens
        if input_ids.shape[1] + max_new_tokens > block_size:
            raise ValueError(
                f"SampleGenerationCallback: longest prompt ({input_ids.shape[1]} tokens) + max_new_tokens "
                f"({max_new_tokens}) exceeds block_size {block_size}; lower max_new_tokens"
            )
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            rank_zero_warn("SampleGenerationCallback writes to TensorBoard, but no TensorBoardLogger is configured")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        texts = self.generate(pl_module)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for number, text in enumerate(texts):
                    # a code block keeps newlines and spacing in TensorBoard's markdown view
                    logger.experiment.add_text(f"samples/{number}", f"```\n{text}\n```", trainer.global_step)

    def generate(self, pl_module) -> List[str]:
        model = pl_module.model
        was_training = model.training
        device = pl_module.device
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(self.seed)
                return generate_texts(model, pl_module.tokenizer, self.prompts, self.generation_config)
        finally:
            model.train(was_training)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` as the newest state of the run: every `every_minutes` of training, after each
    validation and when training ends. (Lightning's `save_last=True` rewrites it only beside another
    checkpoint, so with a monitored metric a finished run's `last.ckpt` could be far behind.)"""

    def __init__(self, dirpath: Optional[str] = None, every_minutes: float = 10.0):
        if every_minutes <= 0:
            raise ValueError(f"last_checkpoint.every_minutes must be > 0, got {every_minutes}")
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
            train_time_interval=timedelta(minutes=every_minutes), enable_version_counter=False,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # beside the run's other checkpoints (best.ckpt) where their directory was chosen
            chosen = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb is not self and cb.dirpath]
            self.dirpath = chosen[0] if chosen else None
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_minutes
        if 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop:
            # the last step (max_steps, an interruption, early stopping), saved here rather than at on_train_end:
            # by then Lightning counts the epoch as finished, and a resumed run would skip the epoch's rest
            self.save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def save_now(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips sanity checks and a step already saved
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class RandomStateCheckpoint(Callback):
    """Stores the random generators' states (torch, CUDA, numpy, Python) in checkpoints and restores them
    when training resumes, so dropout and NEFTune noise continue as in an uninterrupted run (Lightning
    restores model, optimizer and loops, not these)."""

    def __init__(self):
        self.states_to_restore: Optional[dict] = None

    def state_dict(self) -> Dict[str, Any]:
        states = _collect_rng_states()
        if "numpy" in states:  # its key array as a tensor, so checkpoints load with torch.load(weights_only=True)
            name, keys, position, has_gauss, gauss = states["numpy"]
            states["numpy"] = (name, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss)
        return {"rng_states": states}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.states_to_restore = state_dict.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        # the last moment before the first step: nothing draws from the generators after it
        if self.states_to_restore is not None:
            states = dict(self.states_to_restore)
            if "numpy" in states:
                name, keys, position, has_gauss, gauss = states["numpy"]
                states["numpy"] = (name, keys.numpy().astype("uint32"), position, has_gauss, gauss)
            _set_rng_states(states)
            self.states_to_restore = None


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


class NonFiniteLossCheck(Callback):
    """Stops at the first non-finite training loss and never lets a checkpoint with non-finite weights be written.

    Reading the loss on the host each step would make the CPU wait for the GPU every step. Instead the
    step of the first non-finite loss is kept in a device tensor, updated each step without a sync, and
    read every `check_every_n_steps` steps, at the end, and before every checkpoint is written (where the
    weights are checked too): one sync per check, and no checkpoint can hold a diverged model.
    """

    def __init__(self, check_every_n_steps: int = 50):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.first_bad_step: Optional[torch.Tensor] = None  # -1 while every loss has been finite

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_bad_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = trainer.global_step  # the steps done, this batch's included when it stepped
        newly_bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        if step % self.check_every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer, pl_module, weights_too=True)  # raising here stops the file from being written

    def check(self, trainer, pl_module, weights_too: bool = False) -> None:
        bad_step = int(self.first_bad_step) if self.first_bad_step is not None else -1
        params = [p for p in pl_module.parameters() if p.numel()] if weights_too else []
        bad_weights = bool(params) and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        bad = trainer.strategy.reduce_boolean_decision(bad_step >= 0 or bad_weights, all=False)
        if not bad:
            return
        where = f"at step {bad_step}" if bad_step >= 0 else f"by step {trainer.global_step}"
        last_good = newest_checkpoint(trainer)
        raise TrainingDiverged(
            f"the training loss became non-finite (NaN or inf) {where}; stopped without saving. Last good checkpoint: "
            f"{last_good or 'none'}. Lower learning_rate or set gradient_clip_val, and resume or restart"
        )


def newest_checkpoint(trainer) -> Optional[str]:
    """The most recently written checkpoint file of this run's ModelCheckpoint callbacks."""
    paths = {path for cb in trainer.checkpoint_callbacks for path in (cb.best_model_path, cb.last_model_path)}
    paths = [path for path in paths if path and os.path.isfile(path)]
    return max(paths, key=os.path.getmtime) if paths else None


class InterruptCheckpoint(Callback):
    """SIGTERM or SIGINT: finish the optimizer step, save `interrupted-step=N.ckpt`, print the command that resumes.

    Afterwards `exit_code` is 128 + the signal (143 for SIGTERM, 130 for SIGINT), which the command line
    exits with, as cluster schedulers expect of an interrupted job. Lightning's own SIGTERM handling
    stops without saving and exits 0; this replaces it while training runs. A second Ctrl+C stops at once.
    `resume_command`: the command line that resumes, given the checkpoint's path (the CLI sets it).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.saved_path: Optional[str] = None
        self.resume_command: Optional[Callable[[str], str]] = None
        self._previous_handlers: Dict[int, Any] = {}
        self._step_at_batch_start = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = self.exit_code = self.saved_path = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous_handlers = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # in the middle of gradient accumulation: a checkpoint here could not resume exactly
        stop = self.received is not None
        if trainer.world_size > 1:
            # every rank must stop at the same step: one small all-reduce per step, as Lightning's own SIGTERM
            # check under DDP; a single process needs none
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.save_and_stop(trainer)

    def save_and_stop(self, trainer) -> None:
        signum = self.received or signal.SIGTERM  # another rank received it
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(dirpath, f"interrupted-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path, self.exit_code = path, 128 + signum
        trainer.should_stop = True
        resume = self.resume_command(path) if self.resume_command else f"trainer.fit(..., ckpt_path={path!r})"
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            print(f"{name}: saved step {trainer.global_step} to {path}\nresume with: {resume}", file=sys.stderr, flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, worded for runs bounded by max_steps.

    With max_steps set Lightning sets max_epochs to -1, and its bar reads "Epoch 0/-2"; this
    one reads "Epoch 0" then. The logger's version number (v_num) is left out of the metrics.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, most specific
# name first. Lightning's table lacks the H200 and gives Hopper's sparse figure, twice what a dense
# matmul can reach, which would halve the MFU it reports.
DENSE_PEAK_FLOPS_16BIT = (("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12))


def dense_peak_flops(device_name: str, dtype) -> Optional[float]:
    """The dense bf16/fp16 peak of a GPU this table knows, else None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    return next((peak for chip, peak in DENSE_PEAK_FLOPS_16BIT if chip in name), None)


class PeakFlopsThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, made cheap on a GPU, with MFU against the dense peaks above.

    Lightning's reads the clock after every batch, behind a `torch.cuda.synchronize()`: a host sync
    that drains the GPU's queue each step. This one reads it only on the steps whose metrics are
    logged (the other batches are counted, not timed) and not during validation, whose span is
    taken out of the training clock instead. The rolling window is then `window_size` logged steps.
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Optional[Callable[[Any], int]] = None,
        window_size: int = 5,
        separator: str = "/",
        **kwargs,
    ):
        super().__init__(batch_size_fn, length_fn, window_size=window_size, separator=separator, **kwargs)
        self._untimed_batches = 0
        self._validation_start = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return
        peak = dense_peak_flops(torch.cuda.get_device_name(device), _plugin_to_compute_dtype(trainer.precision_plugin))
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(peak)

    def _synchronized_clock(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        logged = not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs
        if not logged:  # count the batch; the next logged step's clock reading covers its time
            stage = trainer.state.stage
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
            if self.length_fn is not None:
                self._lengths[stage] += self.length_fn(batch)
            self._untimed_batches += 1
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        super()._update(trainer, pl_module, batch, iter_num)
        flops = self._throughputs[trainer.state.stage]._flops
        if flops:  # Throughput takes the FLOPs done since its last update: this batch and the untimed ones
            flops[-1] *= self._untimed_batches + 1
        self._untimed_batches = 0

    def _fitting(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING

    @rank_zero_only
    def on_validation_start(self, trainer, *args) -> None:
        if self._fitting(trainer):
            self._validation_start = self._synchronized_clock(trainer)
        else:
            super().on_validation_start(trainer, *args)

    @rank_zero_only
    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if not self._fitting(trainer):  # a `validate` run is timed batch by batch, as Lightning does
            super().on_validation_batch_end(trainer, *args, **kwargs)

    @rank_zero_only
    def on_validation_end(self, trainer, *args) -> None:
        if self._fitting(trainer) and self._validation_start is not None:
            self._t0s[RunningStage.TRAINING] += self._synchronized_clock(trainer) - self._validation_start
            self._validation_start = None
