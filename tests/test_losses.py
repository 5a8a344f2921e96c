"""Distillation losses against the formula written out here and against torch's own losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from picogpt_lightning.losses import default_layer_map, hidden_cosine_loss, kd_loss

B, T, V = 2, 5, 7


def random_logits(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=generator) * 3


def padding_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # the second sequence has two pads
    return mask


# ---- kd_loss ----------------------------------------------------------------------------


def kl_by_formula(student, teacher, temperature, mask):
    """T^2 * mean over real positions of sum_v p_v log(p_v / q_v), one position at a time."""
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            p = [math.exp(z / temperature) for z in teacher[b, t].tolist()]
            q = [math.exp(z / temperature) for z in student[b, t].tolist()]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            total += sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_matches_formula_on_real_tokens(temperature):
    student, teacher, mask = random_logits(0), random_logits(1), padding_mask()
    expected = kl_by_formula(student, teacher, temperature, mask)
    assert kd_loss(student, teacher, temperature, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_matches_kldivloss_with_padding_excluded():
    student, teacher, mask = random_logits(2), random_logits(3), padding_mask()
    temperature = 2.0
    keep = mask.bool()
    # KLDivLoss(input=log q, target=p) sums p (log p - log q); batchmean divides by rows = real tokens
    reference = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(student[keep] / temperature, dim=-1), F.softmax(teacher[keep] / temperature, dim=-1)
    ) * temperature**2
    assert torch.allclose(kd_loss(student, teacher, temperature, mask=mask), reference, atol=1e-6)
    # pad positions carry no weight: changing their logits changes nothing
    student_changed = student.clone()
    student_changed[~keep] = 100.0
    assert torch.allclose(kd_loss(student_changed, teacher, temperature, mask=mask), reference, atol=1e-6)


def test_kd_loss_without_mask_averages_every_position():
    student, teacher = random_logits(4), random_logits(5)
    reference = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        F.log_softmax(student.flatten(0, 1), dim=-1), F.log_softmax(teacher.flatten(0, 1), dim=-1)
    )
    assert torch.allclose(kd_loss(student, teacher), reference, atol=1e-6)


def test_kd_loss_top_k_renormalises_over_teachers_top_tokens():
    student, teacher, mask = random_logits(6), random_logits(7), padding_mask()
    temperature, k = 2.0, 3
    # reference: every logit outside the teacher's top k set to -inf, then KLDivLoss on the k survivors
    top = teacher.topk(k, dim=-1).indices
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, top, False)
    student_masked = student.masked_fill(outside, float("-inf"))
    teacher_masked = teacher.masked_fill(outside, float("-inf"))
    keep = mask.bool()
    log_q = F.log_softmax(student_masked[keep] / temperature, dim=-1)
    p = F.softmax(teacher_masked[keep] / temperature, dim=-1)
    inside = ~outside[keep]
    reference = torch.nn.KLDivLoss(reduction="sum")(log_q[inside], p[inside]) / keep.sum() * temperature**2
    loss = kd_loss(student, teacher, temperature, mask=mask, top_k=k)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, reference, atol=1e-6)
    # top_k = vocab is the full comparison
    full = kd_loss(student, teacher, temperature, mask)
    assert torch.allclose(kd_loss(student, teacher, temperature, mask, top_k=V), full)


def test_kd_loss_is_zero_for_identical_logits_and_has_gradient_to_student_only():
    teacher = random_logits(8)
    student = teacher.clone().requires_grad_(True)
    loss = kd_loss(student, teacher, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert student.grad is not None and not teacher.requires_grad


def test_kd_loss_in_half_precision_is_computed_in_float32():
    student, teacher = random_logits(9), random_logits(10)
    half = kd_loss(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 2.0).item())


def test_kd_loss_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="same batch, length and vocabulary"):
        kd_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


# ---- hidden_cosine_loss -----------------------------------------------------------------


def hidden_states(seed: int, layers: int, width: int):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, width, generator=generator) for _ in range(layers + 1))


def cosine_reference(student, teacher, pairs, mask, projection=None):
    keep = mask.bool()
    losses = []
    for s, t in pairs:
        x = student[s] if projection is None else projection(student[s])
        rows = keep.sum()
        losses.append(F.cosine_embedding_loss(x[keep], teacher[t][keep], torch.ones(rows)))
    return torch.stack(losses).mean()


def test_default_layer_map_takes_every_kth_teacher_layer():
    assert default_layer_map(2, 6) == [(1, 3), (2, 6)]
    assert default_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    with pytest.raises(ValueError, match="not a multiple"):
        default_layer_map(4, 6)


def test_hidden_cosine_loss_matches_cosine_embedding_loss_with_default_map_and_mask():
    student, teacher, mask = hidden_states(0, 2, 8), hidden_states(1, 4, 8), padding_mask()
    expected = cosine_reference(student, teacher, [(1, 2), (2, 4)], mask)
    assert torch.allclose(hidden_cosine_loss(student, teacher, None, mask=mask), expected, atol=1e-6)
    # pads do not count
    changed = tuple(h.clone() for h in student)
    changed[1][~mask.bool()] = -5.0
    assert torch.allclose(hidden_cosine_loss(changed, teacher, None, mask=mask), expected, atol=1e-6)


def test_hidden_cosine_loss_explicit_map_and_projection_for_different_widths():
    student, teacher, mask = hidden_states(2, 3, 6), hidden_states(3, 4, 10), padding_mask()
    projection = torch.nn.Linear(6, 10, bias=False)
    layer_map = {0: 0, 1: 1, 3: 4}
    expected = cosine_reference(student, teacher, layer_map.items(), mask, projection)
    loss = hidden_cosine_loss(student, teacher, layer_map, mask=mask, projection=projection)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert projection.weight.grad is not None


def test_hidden_cosine_loss_is_zero_for_aligned_states_of_any_scale():
    teacher = hidden_states(4, 2, 8)
    student = tuple(3.0 * h for h in teacher)
    assert hidden_cosine_loss(student, teacher, [(1, 1), (2, 2)]).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_cosine_loss_clear_errors():
    student, teacher = hidden_states(5, 2, 6), hidden_states(6, 2, 8)
    with pytest.raises(ValueError, match="pass a projection"):
        hidden_cosine_loss(student, teacher, [(1, 1)])
    with pytest.raises(ValueError, match="out of range"):
        hidden_cosine_loss(student, teacher, [(5, 1)])
