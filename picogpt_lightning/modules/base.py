"""What every training recipe here shares: optimizer, schedule, logging, checkpoint contents.

Subclasses build `self.model` (the PicoGPT being trained) and implement `compute_losses`;
the loop, the optimizer and what goes into a checkpoint live here once, and so does the
handling of a frozen model beside the trained one (a distillation teacher, a DPO reference).
"""

import inspect
import math
import warnings
from typing import Dict, Optional, Tuple

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor
from torchmetrics.text import Perplexity

from picogpt_lightning.callbacks import StepProgressBar
from picogpt_lightning.checkpoints import CONFIG_KEY, STATE_DICT_KEY, TOKENIZER_KEY, strip_compile_prefix
from picogpt_lightning.data.collate import IGNORE_INDEX
from picogpt_lightning.data.tokenizer import Tokenizer
from picogpt_lightning.model import PicoGPTConfig

SCHEDULE_LENGTH_KEY = "picogpt_schedule_length"  # the run's learning-rate schedule length, kept on resume

# Warnings no user can act on: a frozen teacher or reference model is in eval mode on purpose
# (Lightning warns about any at fit start), and recent torch deprecates a check inside Lightning.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over real tokens; labels are already shifted, -100 marks pads.

    A batch without real tokens gives 0, not NaN, so its share of a step's loss sum is 0.
    """
    total = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def flops_per_token(config: PicoGPTConfig, seq_len: int, training: bool = True) -> int:
    """Matmul FLOPs one token costs in a sequence of seq_len tokens (PaLM's appendix B, nanoGPT's MFU).

    Forward: 2 FLOPs per weight of every matmul (attention projections, MLP, lm_head; the
    embedding lookup is no matmul, a tied lm_head is) plus 4 * n_layer * n_embd * seq_len for
    QK^T and attention-times-V. Backward costs twice the forward, so training is 3x.
    """
    head_dims = config.n_head * config.head_size
    attention = config.n_embd * (config.n_head + 2 * config.n_query_groups) * config.head_size
    attention += head_dims * config.n_embd
    mlp = (3 if config.mlp == "swiglu" else 2) * config.n_embd * config.intermediate_size
    matmul_weights = config.n_layer * (attention + mlp) + config.n_embd * config.vocab_size
    forward = 2 * matmul_weights + 4 * config.n_layer * head_dims * seq_len
    return 3 * forward if training else forward


# what Lightning's ThroughputMonitor counts: batch_size_fn and length_fn (configs name them by import path)
def sequences_in_batch(batch: Dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def positions_in_batch(batch: Dict[str, torch.Tensor]) -> int:
    """Token positions computed, pads included: counting real tokens would sync the GPU every step."""
    return batch["input_ids"].numel()


def logs_this_step(trainer: Optional["L.Trainer"]) -> bool:
    """Whether Lightning writes this training step's logged values (every log_every_n_steps).

    Values logged on the other steps are dropped unread, yet each `self.log` call costs about a
    millisecond of host time (Lightning re-homes its record of the value on every call): on a GPU
    that is most of the gap between Trainer.fit and a plain loop, so the step logs only when it counts.
    """
    if trainer is None:
        return True
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine from 1 down to min_ratio, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


class PicoGPTModule(L.LightningModule):
    """Base LightningModule: subclasses set `self.model` and define `compute_losses`."""

    def __init__(
        self,
        config: PicoGPTConfig,
        learning_rate: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: Optional[int] = None,
        weight_decay: float = 0.1,
        betas: Tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
    ):
        super().__init__()
        if learning_rate <= 0 or min_lr < 0 or min_lr > learning_rate:
            raise ValueError(
                f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got learning_rate={learning_rate}, "
                f"min_lr={min_lr}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.config = config
        self.learning_rate = learning_rate
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.compile_model = compile  # `self.compile` would hide nn.Module.compile
        self.compiled_losses = None  # torch.compile(self.compute_losses), built in configure_model
        self.tokenizer = None  # taken from the datamodule in setup(), stored in checkpoints
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._step_items = None  # loss items counted so far in this optimizer step (see training_step)
        self._frozen_saved: Dict[str, bool] = {}  # attribute name of each frozen model -> kept in checkpoints

    # ---- frozen models beside the trained one -----------------------------------------

    def add_frozen(self, name: str, model: nn.Module, save: bool = False) -> nn.Module:
        """Keeps `model` as `self.<name>`, frozen: eval mode for good, no gradients, not in the optimizer,
        and left out of checkpoints unless `save` (it is rebuilt from its own source instead)."""
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        setattr(self, name, model)
        self._frozen_saved[name] = save
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict, except that a frozen model left out of checkpoints may be missing (it comes from its path)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        unsaved = tuple(f"{name}." for name, save in self._frozen_saved.items() if not save)
        missing = [key for key in result.missing_keys if not key.startswith(unsaved)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not match the trained model: missing keys {missing}, "
                f"unexpected keys {result.unexpected_keys}"
            )
        return result

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode every epoch; frozen models keep dropout off
        super().train(mode)
        for name in getattr(self, "_frozen_saved", {}):
            getattr(self, name).eval()
        return self

    # ---- what subclasses define -------------------------------------------------------

    def compute_losses(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({"loss": total, other named parts...}, the trained model's logits).

        Each loss is a mean over the batch's `loss_items`: the base turns it into a sum and
        divides by the whole optimizer step's count (see training_step).
        """
        raise NotImplementedError

    def loss_items(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """How many items the losses of `batch` average over: its real tokens (a per-sequence loss counts sequences)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    # ---- the loop ---------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids, attention_mask=attention_mask, **kwargs)

    def step_losses(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """compute_losses, through its compiled graph when `compile=True`."""
        return (self.compiled_losses or self.compute_losses)(batch)

    # Token-weighted losses: a step's loss is the sum over every real token of the step (all
    # accumulated micro-batches, all ranks) divided by their number, as transformers' Trainer
    # does with num_items_in_batch. Lightning runs each micro-batch's backward before it has
    # seen the next, so the count cannot divide the loss up front. Instead (as fairseq does)
    # each micro-batch backpropagates its loss *sum*, the items are counted on the way, and
    # on_before_optimizer_step divides the summed gradients by the all-reduced count, before
    # clipping and the optimizer. Gradients are linear in the loss, so that is exactly the
    # gradient of sum / count. The count stays a tensor: no host sync.

    def training_step(self, batch, batch_idx):
        losses, _ = self.step_losses(batch)
        if logs_this_step(self._trainer):
            self._log_losses("train", losses, batch, prog_bar=True, on_step=True, on_epoch=False)
        items = self.loss_items(batch)
        self._step_items = items if self._step_items is None else self._step_items + items
        return losses["loss"] * items

    def on_train_epoch_start(self) -> None:
        self._step_items = None  # Lightning steps at every epoch's end, so no step spans two epochs

    def on_before_optimizer_step(self, optimizer) -> None:
        # callbacks' on_before_optimizer_step run just before this and see the summed gradients
        items, self._step_items = self._step_items, None
        if items is None:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(items)  # every rank's micro-batches make up the step
        # Lightning divided each micro-batch's sum by accumulate_grad_batches, DDP/FSDP average over ranks
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / items.clamp(min=1)
        grads = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))

    def configure_callbacks(self):
        callbacks = []
        if self.trainer.loggers:  # the learning rate of every step in the logger's charts; it needs a logger
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if type(self.trainer.progress_bar_callback) is RichProgressBar:  # Lightning's default, not a user's own
            callbacks.append(StepProgressBar())  # replaces it: no "Epoch 0/-2" on max_steps runs
        return callbacks

    # Lightning's ThroughputMonitor reads `flops_per_batch` after each batch to report MFU
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.flops_per_batch = self._batch_flops(batch, training=True)

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self.flops_per_batch = self._batch_flops(batch, training=False)

    def _batch_flops(self, batch, training: bool) -> int:
        batch_size, seq_len = batch["input_ids"].shape  # padded positions cost compute too
        return batch_size * seq_len * self.module_flops_per_token(seq_len, training)

    def module_flops_per_token(self, seq_len: int, training: bool) -> int:
        """FLOPs per token of the trained model; a recipe that also runs a frozen model adds its forward."""
        return flops_per_token(self.config, seq_len, training)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, stage: str) -> None:
        losses, logits = self.step_losses(batch)
        self._log_losses(stage, losses, batch, prog_bar=True, on_step=False, on_epoch=True)
        self.val_perplexity.update(logits.float(), batch["labels"])
        self.log(f"{stage}/ppl", self.val_perplexity, on_step=False, on_epoch=True, sync_dist=True)

    def _log_losses(self, stage, losses, batch, **log_options) -> None:
        # weight each batch by its real tokens so epoch means are per-token means; per-step values
        # need no weight, and counting there would stall the GPU once every training step
        weight = int(self.loss_items(batch)) if log_options.get("on_epoch") else None
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}", value.detach(), batch_size=weight, sync_dist=stage != "train", **log_options
            )

    # ---- setup, optimizer, schedule ---------------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            # TF32 tensor cores for the float32 matmuls left outside autocast (fp32 runs, the loss)
            torch.set_float32_matmul_precision("high")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_block_size = getattr(getattr(datamodule, "hparams", None), "block_size", None)
        if data_block_size is not None and data_block_size > self.config.block_size:
            raise ValueError(
                f"the data's block_size ({data_block_size}) exceeds the model's ({self.config.block_size}); "
                "set both to the same value"
            )
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; set model config vocab_size >= {tokenizer.vocab_size}"
            )
        self.tokenizer = tokenizer

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, parameters sharded as DTensors
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    f"ModelParallelStrategy has tensor_parallel_size {self.device_mesh['tensor_parallel'].size()}, "
                    "but this model shards by FSDP only; set tensor_parallel_size: 1 and data_parallel_size to "
                    "the number of devices (see configs/fsdp.yaml)"
                )
            shard_trainable_modules(self, self.device_mesh["data_parallel"])
        if self.compile_model and self.compiled_losses is None:
            # compile what a step runs, model and loss, as one graph; the model itself stays as it
            # is, so generation (SampleGenerationCallback) runs eagerly instead of recompiling the
            # graph for every decoding shape, and state-dict keys get no `_orig_mod.` prefix
            self.compiled_losses = torch.compile(self.compute_losses)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Norm clipping done here whenever no loss scaler holds the gradients (fp32, bf16).

        Lightning's precision plugins refuse norm clipping with a fused optimizer (mixed
        precision) and with FSDP, although only fp16's scaled gradients make either unsafe.
        Clipping before a fused step is exact when nothing is scaled, and FSDP's root module
        clips its shards against the global norm itself.
        """
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        if not gradient_clip_val or algorithm != GradClipAlgorithmType.NORM or has_loss_scaler(self._trainer):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        sharded = self.trainer.strategy.model
        if isinstance(sharded, FullyShardedDataParallel):
            sharded.clip_grad_norm_(gradient_clip_val)
        else:  # one device, DDP, and FSDP2's DTensors, whose norm torch reduces over the shards
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def configure_optimizers(self):
        matrices = matrix_parameter_ids(self)
        decay, no_decay = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue  # frozen teachers and reference models are not optimized
            # matrices (linear, embedding) decay; gains and biases do not (nanoGPT's rule)
            (decay if id(param) in matrices else no_decay).append(param)
        # the names label the groups' learning rates in the logs (LearningRateMonitor)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "name": "weight_decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_weight_decay"},
        ]
        trainer = self._trainer
        fused = fused_option(decay + no_decay) if fused_adamw_can_clip(trainer) else {}
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas, **fused)
        decay_steps = self.schedule_length = self.resolve_schedule_length()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.warmup_steps, int(decay_steps), self.min_lr / self.learning_rate),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def resolve_schedule_length(self) -> int:
        """Steps of the warmup+cosine schedule: fixed when a run starts and kept when it resumes."""
        length = self.lr_decay_steps or self.trainer.estimated_stepping_batches
        if math.isinf(length):
            raise ValueError(
                "the learning-rate schedule needs a length, but this run has no max_steps or max_epochs limit; "
                "set trainer max_steps or model lr_decay_steps"
            )
        length = int(length)
        stored = getattr(self, "_resumed_schedule_length", None)
        if stored is not None and stored != length:
            rank_zero_warn(
                f"resuming a run whose learning-rate schedule spans {stored} steps; keeping it (this run asks for "
                f"{length}: max_steps or lr_decay_steps changed). Start a new run with init_from to change it."
            )
            return stored
        return length

    # ---- checkpoints ------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # config and tokenizer travel inside the .ckpt so PicoGPT.from_checkpoint needs nothing else
        checkpoint[CONFIG_KEY] = self.config.to_dict()
        if getattr(self, "schedule_length", None) is not None:
            checkpoint[SCHEDULE_LENGTH_KEY] = self.schedule_length
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_dict()
        state_dict = checkpoint.get(STATE_DICT_KEY, {})
        for name, save in self._frozen_saved.items():
            if not save:
                for key in [key for key in state_dict if key.startswith(f"{name}.")]:
                    del state_dict[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_schedule_length = checkpoint.get(SCHEDULE_LENGTH_KEY)  # read by configure_optimizers next
        if STATE_DICT_KEY in checkpoint:  # resuming from a run that wrapped the model in torch.compile
            checkpoint[STATE_DICT_KEY] = strip_compile_prefix(checkpoint[STATE_DICT_KEY])
        if TOKENIZER_KEY in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_dict(checkpoint[TOKENIZER_KEY])


def shard_trainable_modules(module: "PicoGPTModule", mesh) -> None:
    """FSDP2: one unit per transformer block, then the rest of the trained model as the root unit.

    Other trainable parts (a distillation projection) get their own unit so their gradients are
    reduced across ranks too; a frozen teacher or reference stays whole on every rank (it has
    no gradients to reduce). Called again on a model already sharded, it changes nothing.
    """
    if isinstance(module.model.lm_head.weight, DTensor):
        return
    for block in module.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module.model, mesh=mesh)
    for child in module.children():
        if child is not module.model and any(param.requires_grad for param in child.parameters()):
            fully_shard(child, mesh=mesh)


FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu")


def fused_option(params) -> dict:
    """fused=True where torch has a fused AdamW kernel for every one of these parameters.

    The kernel needs floating-point tensors on one supported device type. Sharded parameters
    qualify too: FSDP's flat views are plain tensors and a DTensor reports its local device.
    """
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters or not params:
        return {}
    device_types = {param.device.type for param in params}
    supported = len(device_types) == 1 and device_types <= set(FUSED_ADAMW_DEVICES)
    return {"fused": True} if supported and all(param.is_floating_point() for param in params) else {}


def fused_adamw_can_clip(trainer: Optional["L.Trainer"]) -> bool:
    """False only where gradients are clipped while fp16's loss scaler still holds them scaled.

    A fused step unscales inside itself, after any clipping, so clipping would see scaled
    gradients; there AdamW runs its foreach kernel, nearly as fast. fp32 and bf16 have no
    scaler, and `PicoGPTModule.configure_gradient_clipping` clips before the fused step.
    """
    if trainer is None or not trainer.gradient_clip_val:
        return True
    return not has_loss_scaler(trainer)


def has_loss_scaler(trainer: Optional["L.Trainer"]) -> bool:
    """True under fp16 mixed precision, whose gradients stay scaled until the optimizer step."""
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def matrix_parameter_ids(module: torch.nn.Module) -> set:
    """ids of the weights of linear and embedding layers: the parameters that get weight decay.

    Chosen by layer type, not by `param.dim() >= 2`, because FSDP flattens each shard to 1-D.
    """
    layers = (torch.nn.Linear, torch.nn.Embedding)
    return {id(layer.weight) for layer in module.modules() if isinstance(layer, layers)}

