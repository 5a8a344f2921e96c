"""Knowledge distillation: a student PicoGPT learns from the labels and from a frozen teacher.

    loss = alpha_ce * CE(student, labels)
         + alpha_kd * T^2 KL(softmax(teacher / T) || softmax(student / T))    (Hinton et al., 2015)
         + alpha_cos * (1 - cos(student hidden states, teacher hidden states)) (DistilBERT)
         + alpha_attn * KL of one layer's Q-Q, K-K, V-V attention relations   (MiniLM v2)

Defaults: T = 1, alpha_ce = 0, alpha_kd = 1, alpha_cos = 0: pure forward KL to the
teacher's own distribution.
- DistilBERT used T = 2 and weighted KD : labels : cosine as 5 : 2 : 1. Its task was to
  transfer general knowledge to a student evaluated on other tasks. Here the student is
  judged by the val loss, the cross-entropy of its T = 1 distribution, and the teacher was
  trained on the same data and is far better than the student can become in the same
  steps; its T = 1 distribution is then the best target there is: everything the one-hot
  label says, plus the near misses, with less noise. Softening (T > 1) or mixing in the
  labels trades some of that away: on the CPU pipeline every such mix tried ended at a
  higher val loss than the defaults (BENCHMARKS.md, distillation).
- With a weak teacher, or one trained on other data, give the labels a share again
  (alpha_ce > 0) and try T = 2. The T^2 in kd_loss keeps the KD gradient's size the same
  at any T, so the weights need not be retuned when T changes.
- The cosine loss is off by default: it needs a layer map between the two depths and a
  learned projection between widths, and it ties a small student's layers to a teacher's
  it cannot match; turn it on with alpha_cos > 0 (an explicit layer_map if the teacher's
  depth is not a multiple of the student's).

BitNet Distillation (Wu et al., 2025): a BitNet student with sub_norm=True starts from the
full-precision teacher's weights (`init_from`; BitLinear keeps full-precision latent weights) and
learns from KD plus one layer pair's attention relations (alpha_attn): configs/bitnet_distill.yaml.

The teacher is a checkpoint of this project (a .ckpt or PicoGPT.save file) or any
transformers AutoModelForCausalLM (local directory or hub id). Either way the data must be
tokenized with the teacher's tokenizer: point the data module's `tokenizer` at the same path.
The student takes the teacher's vocabulary size, which may exceed the tokenizer's: many
teachers pad their embedding matrix (Pythia: 50,304 rows for 50,277 tokens). Student and
teacher logits then line up index for index, and the KD loss compares them over that whole
shared vocabulary; a trained teacher gives the padding rows, never a target, almost no mass.
The teacher never trains: its parameters are frozen, it runs in eval mode under no_grad, the
optimizer never sees it, and checkpoints leave it out unless `save_teacher=True`.
"""

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from picogpt_lightning.tokenizer_format import same_tokens
from picogpt_lightning import checkpoints
from picogpt_lightning.errors import UserError
from picogpt_lightning.losses import (
    IGNORE_INDEX, attention_relation_loss, default_layer_map, hidden_cosine_loss, kd_loss, next_token_loss,
)
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.base import PicoGPTModule
from picogpt_lightning.modules.data_link import ModelAwareData, attached_datamodule, data_tokenizer
from picogpt_lightning.modules.teacher import load_teacher, teacher_forward_flops, teacher_layout
from picogpt_lightning.tokenizer import Tokenizer

WARM_START_FREE_FIELDS = ("linear", "sub_norm")  # a BitNet or SubLN student may start from a plain model's weights


class DistillationModule(PicoGPTModule):
    """Trains `self.model` (the student) on labels plus a frozen teacher's outputs.

    Args:
        config: the student's PicoGPTConfig; its vocab_size becomes the teacher's (the CLI's
            link from the data's tokenizer is overridden; the tokenizer must fit in it).
        teacher: a .ckpt of this project, or a transformers model directory / hub id.
        temperature: softmax temperature T of the KD loss.
        alpha_ce, alpha_kd, alpha_cos: weights of the label, KD and hidden-state losses.
        kd_top_k: compare the distributions on the teacher's top-k tokens only (None: all).
        layer_map: {student hidden-state index: teacher index}; None maps student block i
            to teacher block k * i when the teacher is k times deeper. Used when alpha_cos > 0.
        teacher_quantization: "4bit" loads a transformers teacher in NF4 (bitsandbytes, CUDA).
        save_teacher: keep the teacher's weights in this module's checkpoints.
        alpha_attn: weight of the attention-relation loss (needs a PicoGPT teacher).
        attn_layer: (student block, teacher block) whose relations are matched, indices from 0,
            negative from the end; None: the last block of each.
        relation_heads: heads both models' q, k, v split into for relations; None: the student's n_head.
        init_from: a full-precision checkpoint of the student's shape whose weights start the student
            (linear and sub_norm may differ; sub-norms absent from it start at ones), or a Hugging Face
            Llama-family folder. Without `config`, the student is init_from's architecture, and without
            `teacher`, init_from is the teacher too (BitNet Distillation's set-up).
        linear, sub_norm: the student's projections and SubLN, changed from `config` or init_from's.
        **kwargs: optimizer and schedule arguments of PicoGPTModule.
    """

    def __init__(
        self,
        config: Optional[PicoGPTConfig] = None,
        teacher: Optional[str] = None,
        temperature: float = 1.0,
        alpha_ce: float = 0.0,
        alpha_kd: float = 1.0,
        alpha_cos: float = 0.0,
        kd_top_k: Optional[int] = None,
        layer_map: Optional[Dict[int, int]] = None,
        teacher_quantization: Optional[str] = None,
        save_teacher: bool = False,
        alpha_attn: float = 0.0,
        attn_layer: Optional[Tuple[int, int]] = None,
        relation_heads: Optional[int] = None,
        init_from: Optional[str] = None,
        linear: Optional[str] = None,
        sub_norm: Optional[bool] = None,
        **kwargs,
    ):
        start = checkpoints.load(init_from) if init_from is not None else None
        config = student_config(config, start, linear, sub_norm)
        teacher = teacher or init_from
        if teacher is None:
            raise UserError("DistillationModule needs a teacher (or init_from, which then teaches too)")
        super().__init__(config, **kwargs)
        self.save_hyperparameters()
        if start is not None and start.tokenizer_dict is not None:
            self.tokenizer = Tokenizer.from_dict(start.tokenizer_dict)  # data with tokenizer None takes it
        check_weights(temperature, alpha_ce, alpha_kd, alpha_cos, alpha_attn)
        if kd_top_k is not None and kd_top_k < 1:
            raise UserError(f"kd_top_k must be a positive number of tokens or None (all), got {kd_top_k}")
        self.temperature = temperature
        self.alpha_ce, self.alpha_kd, self.alpha_cos = alpha_ce, alpha_kd, alpha_cos
        self.kd_top_k = kd_top_k
        # loading the teacher leaves the random state alone, so with the same seed the student
        # starts from the same weights as the same config trained without a teacher
        with torch.random.fork_rng(devices=[]):
            # the student's starting point teaching too is read once (its tensors become the teacher's)
            teacher_model = load_teacher(start if teacher == init_from else teacher, teacher_quantization)
        self.teacher_vocab_size, teacher_layers, teacher_width = teacher_layout(teacher_model)
        self.config = dataclasses.replace(config, vocab_size=self.teacher_vocab_size)
        self.model = PicoGPT(self.config)
        self.add_frozen("teacher", teacher_model, save=save_teacher)
        self.layer_map = None
        self.hidden_projection = None
        if alpha_cos > 0:
            self.layer_map = resolve_layer_map(layer_map, config.n_layer, teacher_layers)
            if config.n_embd != teacher_width:  # learned, trained with the student, not part of it
                self.hidden_projection = nn.Linear(config.n_embd, teacher_width, bias=False)
        self.alpha_attn, self.attn_layers = alpha_attn, None
        self.relation_heads = config.n_head if relation_heads is None else relation_heads
        if alpha_attn > 0:
            self.attn_layers = resolve_attn_layers(attn_layer, self.relation_heads, self.config, teacher_model)
        self._pending_init_from = start  # loaded at setup, as LanguageModelModule's init_from

    @property
    def uses_teacher(self) -> bool:
        return self.alpha_kd > 0 or self.alpha_cos > 0 or self.alpha_attn > 0

    # ---- the teacher stays frozen (PicoGPTModule.add_frozen) ---------------------------

    @torch.no_grad()
    def teacher_forward(self, batch, output_hidden_states: bool):
        out = self.teacher_output(batch, output_hidden_states)
        return out.logits, out.hidden_states

    @torch.no_grad()
    def teacher_output(self, batch, output_hidden_states: bool, qkv_layer: Optional[int] = None):
        """The teacher's output; `qkv_layer`, a block of a PicoGPT teacher, adds that block's `qkv`."""
        extra = {} if qkv_layer is None else {"output_qkv_layer": qkv_layer}  # transformers models lack the argument
        return self.teacher(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            output_hidden_states=output_hidden_states, use_cache=False, **extra,
        )

    def module_flops_per_token(self, seq_len: int, training: bool) -> int:
        # every step also runs the teacher forward, which counts towards throughput and MFU
        teacher = teacher_forward_flops(self.teacher, seq_len) if self.uses_teacher else 0
        return super().module_flops_per_token(seq_len, training) + teacher

    # ---- losses -----------------------------------------------------------------------

    def compute_losses(self, batch):
        with_hidden = self.alpha_cos > 0
        student_layer, teacher_layer = self.attn_layers or (None, None)
        student = self.model(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=with_hidden,
            output_qkv_layer=student_layer,
        )
        losses = {"ce": next_token_loss(student.logits, batch["labels"])}
        total = self.alpha_ce * losses["ce"]
        if not self.uses_teacher:  # labels only: the teacher's forward would go unused
            return {"loss": total, **losses}, student.logits
        teacher = self.teacher_output(batch, with_hidden, teacher_layer)
        real_tokens = batch["labels"] != IGNORE_INDEX
        losses["kd"] = kd_loss(student.logits, teacher.logits, self.temperature, mask=real_tokens, top_k=self.kd_top_k)
        total = total + self.alpha_kd * losses["kd"]
        if with_hidden:
            losses["cos"] = hidden_cosine_loss(
                student.hidden_states, teacher.hidden_states, self.layer_map, mask=real_tokens,
                projection=self.hidden_projection,
            )
            total = total + self.alpha_cos * losses["cos"]
        if self.attn_layers is not None:
            losses["attn"] = attention_relation_loss(student.qkv, teacher.qkv, self.relation_heads, batch.get("attention_mask"))
            total = total + self.alpha_attn * losses["attn"]
        return {"loss": total, **losses}, student.logits

    def evaluation_losses(self, batch, losses, logits):
        # the student's own cross-entropy, as every recipe's val/loss; the distillation objective beside it
        return {"loss": losses["ce"], "objective": losses["loss"], **{k: v for k, v in losses.items() if k not in ("loss", "ce")}}

    # ---- checks before the first step, and checkpoints ---------------------------------

    def setup(self, stage: str) -> None:
        datamodule = attached_datamodule(self)
        if isinstance(datamodule, ModelAwareData):  # data taking the tokenizer from the model has it now
            datamodule.connect_model(self.tokenizer, self.config.block_size)
        tokenizer = data_tokenizer(datamodule)
        # only a tokenizer larger than the teacher's vocabulary is wrong; a padded vocabulary is fine
        if tokenizer is not None and tokenizer.vocab_size > self.teacher_vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the teacher's vocabulary has "
                f"{self.teacher_vocab_size}; tokenize the data with the teacher's tokenizer "
                f"(data tokenizer: {self.hparams.teacher or self.hparams.init_from!r})"
            )
        super().setup(stage)
        if self._pending_init_from is not None:
            warm_start(self.model, self._pending_init_from, self.tokenizer)
            self._pending_init_from = None  # once: a second fit or validate keeps the trained weights

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_init_from = None  # the checkpoint's own weights replace the starting point


def student_config(config, start, linear: Optional[str], sub_norm: Optional[bool]) -> PicoGPTConfig:
    """The student's architecture: `config`, else init_from's; with linear and sub_norm changed where given."""
    if config is None:
        if start is None:
            raise UserError("DistillationModule needs a student config, or init_from=<checkpoint> to take one from")
        config = start.resolve_config()
    changes = {name: value for name, value in (("linear", linear), ("sub_norm", sub_norm)) if value is not None}
    return dataclasses.replace(config, **changes)


def check_weights(temperature: float, alpha_ce: float, alpha_kd: float, alpha_cos: float, alpha_attn: float) -> None:
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    weights = {"alpha_ce": alpha_ce, "alpha_kd": alpha_kd, "alpha_cos": alpha_cos, "alpha_attn": alpha_attn}
    for name, value in weights.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if sum(weights.values()) == 0:
        raise UserError(f"{', '.join(weights)} are all 0: nothing to train on; set at least one > 0")


def resolve_attn_layers(attn_layer, heads: int, student: PicoGPTConfig, teacher: nn.Module) -> Tuple[int, int]:
    """The (student, teacher) block pair of the relation loss, checked now against both models, as relation_heads."""
    if not isinstance(teacher, PicoGPT):
        raise UserError(
            "alpha_attn > 0 reads the teacher's queries, keys and values, which needs a PicoGPT teacher "
            "(a checkpoint of this project); set alpha_attn 0 for a transformers teacher"
        )
    pair = (-1, -1) if attn_layer is None else tuple(attn_layer)
    if len(pair) != 2:
        raise UserError(f"attn_layer must be a (student block, teacher block) pair, got {attn_layer!r}")
    for name, index, depth in (("student", pair[0], student.n_layer), ("teacher", pair[1], teacher.config.n_layer)):
        if not isinstance(index, int) or not -depth <= index < depth:
            raise UserError(
                f"attn_layer's {name} block {index!r} is out of range; the {name} has blocks -{depth}..{depth - 1}"
            )
    widths = sorted({w for c in (student, teacher.config) for w in (c.n_embd, c.n_query_groups * c.head_size)})
    if not isinstance(heads, int) or heads <= 0 or any(width % heads for width in widths):
        raise UserError(
            f"relation_heads must divide every query and key width of student and teacher {widths}, got {heads!r}; "
            "pick a common divisor (None: the student's n_head)"
        )
    return pair


def warm_start(student: PicoGPT, path, tokenizer) -> None:
    """Copies a full-precision checkpoint's weights into the student, whose linear kind and sub_norm may differ.

    BitLinear keeps full-precision latent weights, so an nn.Linear's weight loads as it is; a fresh
    RMSNorm's weight is ones, so sub-norms the checkpoint lacks start as a plain RMS normalisation.
    """
    checkpoint = checkpoints.load(path)
    path = checkpoint.path
    checkpoints.require_unquantized(checkpoint, "init_from (training needs full-precision weights)")
    if checkpoint.config is not None:
        differences = checkpoints.architecture_differences(checkpoint.config, student.config)
        listed = [f"{name} {a!r} vs {b!r}" for name, (a, b) in differences.items()
                  if name not in WARM_START_FREE_FIELDS]
        if listed:
            raise checkpoints.CheckpointError(
                f"init_from {path} has another architecture than the student ({', '.join(listed)}, checkpoint vs "
                "student); only linear and sub_norm may differ"
            )
    missing, unexpected = student.load_state_dict(checkpoint.state_dict, strict=False)
    missing = [key for key in missing if ".sub_norm." not in key]
    if missing or unexpected:
        raise checkpoints.CheckpointError(
            f"init_from {path} does not match the student: missing keys {missing}, unexpected keys {unexpected}"
        )
    stored_tokenizer = checkpoint.tokenizer_dict
    if stored_tokenizer is not None and tokenizer is not None and not same_tokens(tokenizer.to_dict(), stored_tokenizer):
        raise checkpoints.CheckpointError(
            f"init_from {path} was trained with another tokenizer than the data's; tokenize with its own"
        )


def resolve_layer_map(layer_map: Optional[Dict[int, int]], student_layers: int, teacher_layers: int):
    """The (student, teacher) hidden-state index pairs, checked against both depths now, not mid-training."""
    if layer_map is None:
        return default_layer_map(student_layers, teacher_layers)
    pairs = [(int(s), int(t)) for s, t in dict(layer_map).items()]
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise UserError(
                f"layer_map entry {s}: {t} is out of range: the student has hidden states 0..{student_layers}, "
                f"the teacher 0..{teacher_layers} (0 = embeddings, i = output of block i)"
            )
    if not pairs:
        raise UserError("layer_map is empty; map at least one student layer to a teacher layer, or leave it unset")
    return pairs
