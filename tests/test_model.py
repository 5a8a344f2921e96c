"""PicoGPT against references written out here: attention by hand, RoPE by its formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.model.attention import apply_rotary

import factories


def tiny_config(**overrides) -> PicoGPTConfig:
    return factories.tiny_config(**{"vocab_size": 50, **overrides})


def tiny_model(**overrides) -> PicoGPT:
    return factories.tiny_model(**{"vocab_size": 50, **overrides})


# ---- attention written out by hand ------------------------------------------------------


def rope_by_formula(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, H, T, D). Pair i with i + D/2 and rotate it by angle pos * theta^(-2i/D)."""
    B, H, T, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for pos in range(T):
        for i in range(half):
            angle = pos * theta ** (-2 * i / D)
            a, b = x[:, :, pos, i], x[:, :, pos, i + half]
            out[:, :, pos, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, :, pos, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def reference_attention(attn, x: torch.Tensor, config: PicoGPTConfig) -> torch.Tensor:
    """Causal attention with explicit softmax, each query head reading kv head h // group size."""
    B, T, _ = x.shape
    H, G, D = config.n_head, config.n_query_groups, config.head_size
    q, k, v = attn.qkv(x).split((H * D, G * D, G * D), dim=-1)
    q = rope_by_formula(q.view(B, T, H, D).transpose(1, 2), config.rope_theta)
    k = rope_by_formula(k.view(B, T, G, D).transpose(1, 2), config.rope_theta)
    v = v.view(B, T, G, D).transpose(1, 2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    heads = []
    for h in range(H):
        kv = h // (H // G)
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
    return attn.proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("n_query_groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_hand_written_reference(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    config = model.config
    x = torch.randn(2, 7, config.n_embd)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.rotary(positions)
    attn = model.blocks[0].attn
    ours, _ = attn(x, cos, sin, mask=None)
    expected = reference_attention(attn, x, config)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_rope_matches_formula_and_depends_only_on_relative_position():
    model = tiny_model()
    D = model.config.head_size
    x = torch.randn(1, 2, 9, D)
    cos, sin = model.rotary(torch.arange(9)[None])
    torch.testing.assert_close(apply_rotary(x, cos, sin), rope_by_formula(x, 10000.0), atol=1e-5, rtol=1e-5)

    # <R(m) q, R(n) k> depends on m - n only
    q, k = torch.randn(D), torch.randn(D)

    def rotated_dot(m, n):
        cos, sin = model.rotary(torch.tensor([[m, n]]))
        pair = torch.stack([q, k])[None, None]  # (1, 1, 2, D)
        rq, rk = apply_rotary(pair, cos, sin)[0, 0]
        return float(rq @ rk)

    assert rotated_dot(5, 2) == pytest.approx(rotated_dot(13, 10), abs=1e-4)
    assert rotated_dot(5, 2) != pytest.approx(rotated_dot(5, 4), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_angles_stay_exact_in_a_half_precision_model(dtype):
    """`.to(dtype)` (bf16-true, a bf16 from_hf) must not round the frequencies: by position 255 a
    bf16 frequency is off by up to 0.1 rad for head size 64."""
    model = PicoGPT(PicoGPTConfig(vocab_size=16, block_size=256, n_layer=1, n_embd=128, n_head=2)).to(dtype)
    head_size, theta = model.config.head_size, model.config.rope_theta
    positions = torch.arange(256)
    cos, sin = model.rotary(positions[None])  # float32 tables, as the model builds them before casting
    exponents = torch.arange(0, head_size, 2, dtype=torch.float64) / head_size
    angles = positions[:, None].double() / theta**exponents  # (T, head_size / 2), float64
    angles = torch.cat((angles, angles), dim=-1)
    torch.testing.assert_close(cos[0, 0].double(), angles.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[0, 0].double(), angles.sin(), atol=2e-5, rtol=0)


# ---- causality and padding --------------------------------------------------------------


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("n_query_groups", [4, 2], ids=["mha", "gqa"])
def test_padded_batch_equals_each_sequence_alone(side, n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    lengths = [11, 4, 7]
    sequences = [torch.randint(1, 50, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(T - len(seq), T) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row, seq in enumerate(sequences):
            alone = model(seq[None]).logits[0]
            real = batched[row][mask[row].bool()]
            torch.testing.assert_close(real, alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("keep", [1, 3, 12, 20])
def test_logits_to_keep_equals_the_last_rows_of_the_full_forward(keep):
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the kept rows are still the last positions
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        kept = model(ids, attention_mask=mask, logits_to_keep=keep).logits
        assert torch.equal(model(ids, logits_to_keep=0).logits, model(ids).logits)
    assert kept.shape == (2, min(keep, 12), 50)
    torch.testing.assert_close(kept, full[:, -keep:])


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_logits_to_keep_rejects_what_is_not_a_count(bad):
    with pytest.raises(Exception, match="logits_to_keep must be an int >= 0"):
        tiny_model()(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)


def test_hidden_states_layout():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    torch.testing.assert_close(out.hidden_states[0], model.tok_embeddings(ids))
    # the last entry is normed: lm_head of it gives the logits
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_tied_weights_and_residual_init_scale():
    torch.manual_seed(0)
    model = PicoGPT(tiny_config(n_layer=8, n_embd=128, n_head=4, n_query_groups=4))
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    untied = PicoGPT(tiny_config(tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_embeddings.weight


def test_gelu_mlp_option():
    model = tiny_model(mlp="gelu")
    x = torch.randn(3, model.config.n_embd)
    mlp = model.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.proj(F.gelu(mlp.fc(x))))
    assert model.config.intermediate_size == 4 * model.config.n_embd


# ---- NEFTune ----------------------------------------------------------------------------


def embedding_noise(model, ids, mask):
    """The noise NEFTune added: embedding dropout's input minus the clean embedding."""
    seen = {}
    handle = model.embed_dropout.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    return seen["x"] - model.tok_embeddings(ids)


def test_neftune_off_in_eval_and_bounded_in_training():
    alpha, d, T = 5.0, 32, 30
    torch.manual_seed(0)
    model = PicoGPT(tiny_config(neftune_noise_alpha=alpha))
    ids = torch.randint(1, 50, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 10:] = 0  # second sequence: 10 real tokens, 20 pads

    model.eval()
    assert embedding_noise(model, ids, mask).abs().max() == 0

    model.train()
    noise = embedding_noise(model, ids, mask)
    full_bound = alpha / math.sqrt(T * d)
    short_bound = alpha / math.sqrt(10 * d)  # L counts real tokens only
    assert noise[0].abs().max() <= full_bound + 1e-7
    assert noise[0].abs().max() > 0.95 * full_bound  # uniform on [-a, a] reaches near a
    assert noise[1, :10].abs().max() <= short_bound + 1e-7
    assert noise[1, :10].abs().max() > max(0.95 * short_bound, full_bound)
    assert noise[1, 10:].abs().max() == 0  # pads stay clean
    # uniform noise: mean ~0, variance a^2 / 3
    assert noise[0].var().item() == pytest.approx(full_bound**2 / 3, rel=0.1)


def test_neftune_disabled_when_alpha_zero():
    model = tiny_model()
    model.train()
    ids = torch.randint(0, 50, (1, 8))
    assert embedding_noise(model, ids, None).abs().max() == 0


# ---- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=4, n_query_groups=3), "n_query_groups"),
        (dict(n_embd=36, n_head=4, n_query_groups=4), "even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_embd=0), "n_embd"),
        (dict(n_head=0), "n_head"),
        (dict(n_query_groups=0), "n_query_groups"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(mlp="relu"), "mlp"),
        (dict(linear="fancy"), "linear"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(neftune_noise_alpha=-1.0), "neftune_noise_alpha"),
    ],
)
def test_config_validation_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    message = str(info.value)
    assert field in message and "\n" not in message


def test_config_defaults_and_round_trip():
    config = PicoGPTConfig(n_embd=384, n_head=6)
    assert config.n_query_groups == 6
    assert config.intermediate_size == 1024  # llama's 8/3 * 384 = 1024
    assert PicoGPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        PicoGPTConfig.from_dict({**config.to_dict(), "n_layers": 3})


def test_sequence_longer_than_block_size_attends_through_a_sliding_window():
    # in one layer, each position sees itself and the block_size - 1 before it, no further (with more
    # layers the windows stack, as in Mistral; tests/test_sliding_window.py compares with it)
    model = tiny_model(block_size=8, n_layer=1)
    ids = torch.randint(0, 40, (1, 20))
    with torch.no_grad():
        long = model(ids).logits
        for end in (8, 13, 20):
            window = model(ids[:, end - 8 : end], position_ids=torch.arange(end - 8, end)[None]).logits
            torch.testing.assert_close(long[:, end - 1], window[:, -1], atol=1e-5, rtol=1e-5)


# ---- KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_query_groups", [4, 1])
def test_cached_chunks_equal_one_pass(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        second = model(ids[:, 5:9], past_key_values=first.past_key_values, use_cache=True)
        third = model(ids[:, 9:], past_key_values=second.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), full, atol=1e-5, rtol=1e-5)


# ---- saving and loading -----------------------------------------------------------------


def test_save_and_from_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    model.save(str(path))
    loaded = PicoGPT.from_checkpoint(str(path)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_from_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        PicoGPT.from_checkpoint(str(tmp_path / "missing.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupted"):
        PicoGPT.from_checkpoint(str(broken))
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model().state_dict(), bare)
    with pytest.raises(ValueError, match="no model config"):
        PicoGPT.from_checkpoint(str(bare))
    assert PicoGPT.from_checkpoint(str(bare), config=tiny_config()) is not None
    with pytest.raises(ValueError, match="does not match"):
        PicoGPT.from_checkpoint(str(bare), config=tiny_config(n_embd=64))
