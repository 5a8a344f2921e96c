"""PicoGPT <-> transformers LlamaForCausalLM: same logits, exact round trips, loadable exports."""

import pytest
import torch

from picogpt_lightning import PicoGPT
from picogpt_lightning.hf import from_hf, save_pretrained, to_hf

import factories
from factories import randomize

TINY = dict(vocab_size=48, block_size=32, n_layer=2, n_embd=32, n_head=4)


def tiny_model(**overrides) -> PicoGPT:
    # trained-looking norms: a gain of exactly 1 would hide a swapped norm
    return randomize(factories.tiny_model(**{**TINY, "n_query_groups": None, **overrides}), only_norms_and_biases=True)


def padded_batch():
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, TINY["vocab_size"], (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    attention_mask[2, :2] = 0
    return input_ids, attention_mask


VARIANTS = {
    "gqa-tied": dict(n_query_groups=2),
    "mqa": dict(n_query_groups=1),
    "mha-untied": dict(tie_weights=False),
    "bias-theta-eps": dict(n_query_groups=2, bias=True, rope_theta=500.0, norm_eps=1e-6, intermediate_size=80),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_exported_logits_equal_picogpt(overrides):
    model = tiny_model(**overrides)
    llama = to_hf(model)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        ours = model(input_ids).logits
        theirs = llama(input_ids).logits
        assert (ours - theirs).abs().max() <= 1e-4
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = llama(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # pad positions' outputs are meaningless in both
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_llama_config_carries_the_architecture():
    model = tiny_model(n_query_groups=2, rope_theta=500.0, norm_eps=1e-6)
    config = to_hf(model, bos_token_id=3, eos_token_id=4, pad_token_id=5).config
    assert config.num_key_value_heads == 2
    assert config.num_attention_heads == 4
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 500.0
    assert config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == TINY["block_size"]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (3, 4, 5)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_round_trip_is_exact(overrides):
    model = tiny_model(**overrides)
    back = from_hf(to_hf(model))
    assert back.config == model.config
    original, restored = model.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert (back.lm_head.weight is back.tok_embeddings.weight) == model.config.tie_weights


def test_from_hf_of_a_llama_built_by_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
    )
    llama = LlamaForCausalLM(config).eval()
    model = from_hf(llama)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = llama(input_ids, attention_mask=attention_mask).logits
    assert (ours - theirs)[attention_mask.bool()].abs().max() <= 1e-4


def test_gelu_mlp_has_no_llama_equivalent():
    with pytest.raises(ValueError, match="mlp='gelu' has no Llama equivalent"):
        to_hf(tiny_model(mlp="gelu"))


def test_unsupported_llama_variants_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    scaled = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0},
    )
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(LlamaForCausalLM(scaled))


def test_legacy_rope_keys_of_a_saved_config_are_honoured_or_refused(tmp_path):
    """A config.json from transformers 4 keeps `rope_theta` and `rope_scaling` at the top level."""
    import json

    from transformers import AutoConfig

    from picogpt_lightning.hf import picogpt_config

    base = dict(
        model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, hidden_act="silu", rope_theta=500000.0,
    )
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert picogpt_config(AutoConfig.from_pretrained(tmp_path)).rope_theta == 500000.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({**base, "rope_scaling": llama3}))
    assert picogpt_config(AutoConfig.from_pretrained(tmp_path)).rope_scaling == llama3
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({**base, "rope_scaling": dynamic}))
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        picogpt_config(AutoConfig.from_pretrained(tmp_path))


def test_saved_directory_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from picogpt_lightning.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("char", "hello world, the quick brown fox!")
    model = tiny_model(vocab_size=tokenizer.vocab_size, n_query_groups=2)
    save_pretrained(model, tmp_path / "export", tokenizer)

    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    text = "the brown fox"
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        assert (model(input_ids).logits - llama(input_ids).logits).abs().max() <= 1e-4
    # no newline in this vocabulary: the export's eos is its first symbol, the space; generate past it
    assert hf_tokenizer.eos_token == " "
    assert hf_tokenizer.decode(model.generate(input_ids, max_new_tokens=5)[0]) == tokenizer.decode(
        llama.generate(input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]
    )
