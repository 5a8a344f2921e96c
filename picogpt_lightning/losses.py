"""Losses for language modelling, distillation and preference alignment, as pure functions of tensors (no modules, no Lightning).

Shapes: logits are (B, T, vocab), hidden states (B, T, width), masks (B, T) with 1 on the
real tokens, labels (B, T) pre-shifted with -100 on ignored positions. Every reduction is in
float32, whatever the model's precision: softmax and KL of half-precision logits lose the
small probabilities that distillation is about, and DPO compares sums of many log-probs.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from picogpt_lightning.errors import UserError

IGNORE_INDEX = -100  # the label that cross_entropy (and transformers) skip
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
LayerMap = Union[Dict[int, int], Sequence[Tuple[int, int]]]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over real tokens; labels are already shifted, -100 marks pads.

    A batch without real tokens gives 0, not NaN, so its share of a step's loss sum is 0.
    """
    total = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """Hinton's distillation loss: T^2 * KL(teacher || student) of softmax(logits / T), per real token.

    KL(p || q) = sum_v p_v (log p_v - log q_v) is taken at every position, then averaged over
    the positions where `mask` is 1 (all positions when `mask` is None). The T^2 factor keeps
    the gradient's size independent of T, so the weight of this loss need not change with T.

    top_k: compare only the teacher's k most likely tokens at each position, both
    distributions renormalised over those k. That is the same as setting every other logit to
    -inf; gathering the k logits computes it without the 0 * -inf a masked vocabulary would hit.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; distillation needs the same batch, length and vocabulary"
        )
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    student, teacher = student_logits.float(), teacher_logits.float()
    if top_k is not None:
        if not 0 < top_k <= teacher.shape[-1]:
            raise UserError(f"top_k must be in [1, vocab size {teacher.shape[-1]}], got {top_k}")
        top = teacher.topk(top_k, dim=-1).indices
        student, teacher = student.gather(-1, top), teacher.gather(-1, top)

    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return masked_mean(per_position, mask) * temperature**2


def default_layer_map(student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """Student block i -> teacher block k * i, when the teacher is k times deeper.

    Indices are those of `hidden_states` (0 = embeddings, i = output of block i), so the
    student's last block meets the teacher's last block, both after the final norm.
    """
    if teacher_layers % student_layers != 0:
        raise UserError(
            f"the teacher's {teacher_layers} layers are not a multiple of the student's {student_layers}; "
            "pass layer_map explicitly, e.g. {student_layer: teacher_layer, ...}"
        )
    k = teacher_layers // student_layers
    return [(i, k * i) for i in range(1, student_layers + 1)]


def hidden_cosine_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Optional[LayerMap] = None,
    mask: Optional[torch.Tensor] = None,
    projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Mean of 1 - cos(student state, teacher state) over mapped layers and real tokens.

    This is cosine_embedding_loss with target 1 (DistilBERT's hidden-state loss): it aligns
    directions only, so the two models' scales may differ. `student_hidden` and
    `teacher_hidden` are `hidden_states` tuples (embeddings first). `layer_map` pairs
    (student index, teacher index); None takes `default_layer_map`. `projection` (one
    learned linear map, as TinyBERT's) takes student states to the teacher's width when
    the widths differ.
    """
    if layer_map is None:
        layer_map = default_layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    pairs = list(layer_map.items()) if isinstance(layer_map, dict) else [tuple(pair) for pair in layer_map]
    if not pairs:
        raise UserError("layer_map is empty; map at least one student layer to a teacher layer")
    losses = []
    for student_index, teacher_index in pairs:
        if not (0 <= student_index < len(student_hidden) and 0 <= teacher_index < len(teacher_hidden)):
            raise UserError(
                f"layer_map pair ({student_index}, {teacher_index}) is out of range: the student has hidden "
                f"states 0..{len(student_hidden) - 1}, the teacher 0..{len(teacher_hidden) - 1}"
            )
        student = student_hidden[student_index]
        if projection is not None:
            student = projection(student)
        teacher = teacher_hidden[teacher_index]
        if student.shape != teacher.shape:
            raise UserError(
                f"student hidden state {tuple(student.shape)} and teacher hidden state {tuple(teacher.shape)} "
                "differ; pass a projection from the student's width to the teacher's"
            )
        cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
        losses.append(masked_mean(1.0 - cosine, mask))
    return torch.stack(losses).mean()


def attention_relation_loss(
    student_qkv: Sequence[torch.Tensor],
    teacher_qkv: Sequence[torch.Tensor],
    relation_heads: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MiniLM-v2's self-attention relation loss, the mean of its Q-Q, K-K and V-V terms.

    `student_qkv` and `teacher_qkv` are one layer's (queries, keys, values), each (B, heads, T,
    head_size) as `PicoGPT(..., output_qkv_layer=i).qkv` gives them, or (B, T, width). Each is
    joined across its heads to (B, T, width) and split into `relation_heads` heads of width
    d_r = width / relation_heads; a head's relation is softmax over positions of X X^T / sqrt(d_r),
    (T x T). The loss is KL(teacher relation || student relation) per position, averaged over
    relation heads and real positions. Both models split into the same number of relation heads,
    so relations compare across widths and head counts. `mask` (B, T): padding (0) is left out
    as key and as query.
    """
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise UserError("attention_relation_loss needs (queries, keys, values) of the student and of the teacher")
    if not isinstance(relation_heads, int) or relation_heads <= 0:
        raise UserError(f"relation_heads must be a positive integer, got {relation_heads!r}")
    losses = []
    for name, student, teacher in zip(("queries", "keys", "values"), student_qkv, teacher_qkv):
        student_log = relation_log_probs(joined_heads(student), relation_heads, mask, f"student {name}")
        teacher_log = relation_log_probs(joined_heads(teacher), relation_heads, mask, f"teacher {name}")
        if student_log.shape != teacher_log.shape:
            raise UserError(
                f"student {name} {tuple(student.shape)} and teacher {name} {tuple(teacher.shape)} differ in batch "
                "or length; relations need the same tokens through both models"
            )
        per_query = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)  # (B, heads, T)
        losses.append(masked_mean(per_query.mean(dim=1), mask))
    return torch.stack(losses).mean()


def joined_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, head_size) -> (B, T, heads * head_size); (B, T, width) as it is."""
    return x.transpose(1, 2).flatten(2) if x.dim() == 4 else x


def relation_log_probs(x: torch.Tensor, heads: int, mask: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) of each relation head r, (B, heads, T, T), in float32."""
    B, T, width = x.shape
    if width % heads != 0:
        raise UserError(f"{name} have width {width}, not divisible by relation_heads={heads}; pick a divisor of it")
    split = x.float().view(B, T, heads, width // heads).transpose(1, 2)  # (B, heads, T, d_r)
    scores = split @ split.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        # the float32 minimum, not -inf: a padding key then gets probability exactly 0 in both models,
        # and 0 * (finite log-ratio) keeps the KL and its gradient free of NaN
        keys = mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~keys, torch.finfo(torch.float32).min)
    return F.log_softmax(scores, dim=-1)


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the (B, T) `values` where `mask` is nonzero; a batch of no real tokens gives 0, not NaN."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise UserError(f"mask has shape {tuple(mask.shape)}, expected {tuple(values.shape)} (batch, length)")
    # torch.where, not values[mask]: boolean indexing has a data-dependent shape, which syncs the
    # host with the GPU and breaks a compiled graph
    keep = mask.bool()
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp(min=1)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log p(sequence): the sum over each row of log p(labels[t] | inputs up to t), shape (B,).

    Labels are pre-shifted (labels[t] is the token after input t), -100 on the prompt and the
    padding, so only completion tokens count. `average=True` divides by their number (IPO).
    The mask multiplies rather than indexes, so the shapes never depend on the data (no host
    sync, one compiled graph).
    """
    if logits.shape[:2] != labels.shape:
        raise UserError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in batch or length")
    real = labels != IGNORE_INDEX
    targets = labels.masked_fill(~real, 0).unsqueeze(-1)  # any valid id; its log-prob is masked away
    logits = logits.float()
    token_log_probs = (logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)) * real
    total = token_log_probs.sum(dim=-1)
    return total / real.sum(dim=-1).clamp(min=1) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023), per pair, in trl 0.28's conventions.

    With d = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected):
      "sigmoid": -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d), e = label_smoothing:
                 conservative DPO as in Mitchell's cDPO note and trl <= 0.28 (trl >= 1.0 applies
                 label_smoothing to its robust variants only); e = 0 is plain DPO;
      "ipo":     (d - 1 / (2 beta))^2 (Azar et al., 2023; pass log-probs averaged over tokens);
      "hinge":   relu(1 - beta d) (SLiC).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are the implicit
    beta * (policy - reference) of the log-probs passed in, detached, for logging. For "ipo"
    those are the per-token averages, so its rewards are beta times the averaged log-ratio,
    as trl 0.28 logs them (trl >= 1.0 logs beta times the summed log-ratio for every loss type).
    """
    check_dpo_options(beta, label_smoothing, loss_type)
    policy_chosen, policy_rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    reference_chosen, reference_rejected = reference_chosen_logps.float(), reference_rejected_logps.float()
    d = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * d)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def check_dpo_options(beta: float, label_smoothing: float, loss_type: str) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise UserError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing must be in [0, 0.5) (the assumed share of flipped labels), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise UserError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")
