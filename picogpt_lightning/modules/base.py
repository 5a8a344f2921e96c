"""What every training recipe here shares: the loop, logging, the optimizer's set-up, checkpoint contents.

Subclasses build `self.model` (the PicoGPT being trained) and implement `compute_losses`;
the loop, the optimizer and what goes into a checkpoint live here once, and so does the
handling of a frozen model beside the trained one (a distillation teacher, a DPO reference).
"""

import math
from typing import Dict, Optional, Tuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import nn
from torchmetrics.text import Perplexity

from picogpt_lightning.callbacks.log_steps import logs_at_step
from picogpt_lightning.checkpoints import CONFIG_KEY, STATE_DICT_KEY, TOKENIZER_KEY, strip_compile_prefix
from picogpt_lightning.errors import UserError
from picogpt_lightning.losses import IGNORE_INDEX, next_token_loss
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.modules.adapters import check_same_base, keep_adapters_only, missing_base_keys
from picogpt_lightning.modules.data_link import ModelAwareData, attached_datamodule, attached_trainer, data_tokenizer
from picogpt_lightning.modules.flops import flops_per_token, positions_in_batch, sequences_in_batch
from picogpt_lightning.modules.muon import MuonOptions, check_optimizer_name, muon_with_adamw
from picogpt_lightning.modules.optim import adamw, adamw_groups, has_loss_scaler, warmup_cosine, warmup_cosine_schedule
from picogpt_lightning.modules.sharding import check_data_parallel_mesh, clip_grad_norm, shard_trainable_modules
from picogpt_lightning.tokenizer import Tokenizer

# configs and scripts name these by their path in this module
__all__ = [
    "PicoGPTModule", "flops_per_token", "logs_this_step", "next_token_loss", "positions_in_batch",
    "sequences_in_batch", "warmup_cosine",
]

SCHEDULE_LENGTH_KEY = "picogpt_schedule_length"  # the run's learning-rate schedule length, kept on resume


def logs_this_step(trainer: Optional[L.Trainer]) -> bool:
    """Whether Lightning writes this training step's logged values (every log_every_n_steps).

    Values logged on the other steps are dropped unread, yet each `self.log` call costs about a
    millisecond of host time (Lightning re-homes its record of the value on every call): on a GPU
    that is most of the gap between Trainer.fit and a plain loop, so the step logs only when it counts.
    """
    if trainer is None:
        return True
    return logs_at_step(trainer, trainer.global_step + 1) or bool(trainer.fast_dev_run)


class PicoGPTModule(L.LightningModule):
    """Base LightningModule: subclasses set `self.model` and define `compute_losses`."""

    progress_bar_losses: Tuple[str, ...] = ("loss",)  # of compute_losses' parts, the ones the progress bar shows

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
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        muon_adjust_lr: str = "original",
    ):
        """optimizer: "adamw" trains every parameter with AdamW at learning_rate; "muon" trains the blocks'
        matrices with torch.optim.Muon (muon_lr, muon_momentum, muon_weight_decay, muon_adjust_lr: its
        adjust_lr_fn) and the rest (embeddings, norms, lm_head) with AdamW; see modules/muon.py."""
        super().__init__()
        if learning_rate <= 0 or min_lr < 0 or min_lr > learning_rate:
            raise UserError(
                f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got learning_rate={learning_rate}, "
                f"min_lr={min_lr}"
            )
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= weight_decay:
            raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
        self.config = config
        self.learning_rate = learning_rate
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.optimizer_name = check_optimizer_name(optimizer)
        self.muon_options = MuonOptions(muon_lr, muon_momentum, muon_weight_decay, muon_adjust_lr)
        self.compile_model = compile  # `self.compile` would hide nn.Module.compile
        self.compiled_losses = None  # torch.compile(self.compute_losses), built in configure_model
        self.tokenizer = None  # taken from the datamodule in setup(), stored in checkpoints
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._step_items = None  # loss items counted so far in this optimizer step (see training_step)
        self._frozen_saved: Dict[str, bool] = {}  # attribute name of each frozen model -> kept in checkpoints
        self.lora_entry = None  # a LoRA run's base and settings (modules/adapters.py): checkpoints keep adapters only

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
        missing = [key for key in missing_base_keys(result.missing_keys, self.lora_entry) if not key.startswith(unsaved)]
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

    def module_flops_per_token(self, seq_len: int, training: bool) -> int:
        """FLOPs per token of the trained model; a recipe that also runs a frozen model adds its forward."""
        return flops_per_token(self.config, seq_len, training)

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
        if logs_this_step(attached_trainer(self)):
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

    # Lightning's ThroughputMonitor reads `flops_per_batch` after each batch to report MFU
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.flops_per_batch = self._batch_flops(batch, training=True)

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self.flops_per_batch = self._batch_flops(batch, training=False)

    def _batch_flops(self, batch, training: bool) -> int:
        batch_size, seq_len = batch["input_ids"].shape  # padded positions cost compute too
        return batch_size * seq_len * self.module_flops_per_token(seq_len, training)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def evaluation_losses(self, batch, losses: Dict[str, torch.Tensor], logits) -> Dict[str, torch.Tensor]:
        """What validation and test log: `loss` is always the trained model's next-token cross-entropy on the
        data, so runs of every recipe compare on one curve; a recipe whose objective differs logs it as
        `objective` (compute_losses' `loss`) beside it."""
        return losses

    def _evaluate(self, batch, stage: str) -> None:
        losses, logits = self.step_losses(batch)
        losses = self.evaluation_losses(batch, losses, logits)
        self._log_losses(stage, losses, batch, prog_bar=True, on_step=False, on_epoch=True)
        self.val_perplexity.update(logits.float(), batch["labels"])
        self.log(f"{stage}/ppl", self.val_perplexity, on_step=False, on_epoch=True, sync_dist=True)

    def _log_losses(self, stage, losses, batch, prog_bar: bool = False, **log_options) -> None:
        # weight each batch by its real tokens so epoch means are per-token means; per-step values
        # need no weight, and counting there would stall the GPU once every training step
        weight = int(self.loss_items(batch)) if log_options.get("on_epoch") else None
        for name, value in losses.items():
            shown = prog_bar and name in self.progress_bar_losses  # the rest in TensorBoard only
            self.log(
                f"{stage}/{name}", value.detach(), batch_size=weight, sync_dist=stage != "train", prog_bar=shown,
                **log_options,
            )

    # ---- setup, optimizer, schedule ---------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = attached_datamodule(self)
        if isinstance(datamodule, ModelAwareData):  # it checks its own block_size against the model's
            datamodule.connect_model(self.tokenizer, self.config.block_size)
        tokenizer = data_tokenizer(datamodule)
        if tokenizer is None:
            return
        if tokenizer.vocab_size > self.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; set model config vocab_size >= {tokenizer.vocab_size}"
            )
        self.tokenizer = tokenizer

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, parameters sharded as DTensors
            check_data_parallel_mesh(self.device_mesh)
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
        if gradient_clip_val is not None and gradient_clip_val < 0:  # torch would scale every gradient by a negative
            raise UserError(
                f"gradient_clip_val {gradient_clip_val} is negative, which flips the gradient's sign; "
                "give a value > 0, or 0 or None for no clipping"
            )
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        if not gradient_clip_val or algorithm != GradClipAlgorithmType.NORM or has_loss_scaler(self.trainer):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_grad_norm(self, self.trainer.strategy.model, gradient_clip_val)

    def configure_optimizers(self):
        trainer = attached_trainer(self)
        if self.optimizer_name == "muon":
            optimizer = muon_with_adamw(
                self, self.model.blocks, self.muon_options, self.learning_rate, self.weight_decay, self.betas, trainer
            )
        else:
            optimizer = adamw(adamw_groups(self, self.weight_decay), self.learning_rate, self.betas, trainer)
        self.schedule_length = self.resolve_schedule_length()
        schedule = warmup_cosine_schedule(
            optimizer, self.warmup_steps, self.schedule_length, self.min_lr / self.learning_rate
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def resolve_schedule_length(self) -> int:
        """Steps of the warmup+cosine schedule: fixed when a run starts and kept when it resumes."""
        length = self.lr_decay_steps or self.trainer.estimated_stepping_batches
        if math.isinf(length):
            raise UserError(
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
        keep_adapters_only(state_dict, self.lora_entry, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_schedule_length = checkpoint.get(SCHEDULE_LENGTH_KEY)  # read by configure_optimizers next
        check_same_base(self.lora_entry, checkpoint)
        if STATE_DICT_KEY in checkpoint:  # resuming from a run that wrapped the model in torch.compile
            checkpoint[STATE_DICT_KEY] = strip_compile_prefix(checkpoint[STATE_DICT_KEY])
        if TOKENIZER_KEY in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_dict(checkpoint[TOKENIZER_KEY])
