"""Past block_size: PicoGPT against transformers' MistralForCausalLM with sliding_window=block_size.

Mistral is llama with a sliding window, so the exported llama weights load into it unchanged;
its window counts cache positions, each query seeing itself and the window - 1 before it.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig, MistralConfig, MistralForCausalLM

from picogpt_lightning.hf import llama_state_dict
from picogpt_lightning.model.cache import StaticKVCache
from test_generation import peaked_model

BLOCK = 12  # small, so every test runs well past it
PROMPT = 5


def mistral_of(model) -> MistralForCausalLM:
    c = model.config
    config = MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size, max_position_embeddings=4096, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_weights, sliding_window=c.block_size,
    )
    mistral = MistralForCausalLM(config)
    mistral.load_state_dict(llama_state_dict(model), strict=not c.tie_weights)
    return mistral.eval()


@pytest.fixture(scope="module")
def models():
    model = peaked_model(seed=3, block_size=BLOCK)
    return model, mistral_of(model)


@pytest.fixture(scope="module")
def padded_prompts():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 40, (2, PROMPT), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    return input_ids.masked_fill(attention_mask == 0, 1), attention_mask


def test_forward_past_block_size_equals_mistral(models):
    model, mistral = models
    ids = torch.randint(0, 40, (2, 3 * BLOCK + 1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mistral(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("options", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beam"])
def test_decoding_past_block_size_equals_mistral(models, padded_prompts, cache, options):
    model, mistral = models
    input_ids, attention_mask = padded_prompts
    new = 4 * BLOCK  # the static ring wraps four times
    common = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    ours = model.generate(input_ids, attention_mask=attention_mask, cache_implementation=cache, disable_compile=True, **common)
    theirs = mistral.generate(input_ids, attention_mask=attention_mask, min_new_tokens=new, **common)
    assert ours.shape[1] == PROMPT + new
    assert torch.equal(ours, theirs)


def test_a_prompt_longer_than_block_size_equals_mistral(models):
    model, mistral = models
    ids = torch.randint(3, 40, (1, 2 * BLOCK + 3))
    for cache in (None, "static"):
        ours = model.generate(ids, max_new_tokens=BLOCK, cache_implementation=cache, disable_compile=True)
        assert torch.equal(ours, mistral.generate(ids, max_new_tokens=BLOCK, min_new_tokens=BLOCK, do_sample=False))


def test_static_ring_and_growing_cache_sample_the_same_tokens(models, padded_prompts):
    model, _ = models
    input_ids, attention_mask = padded_prompts
    samples = []
    for cache in ("dynamic", "static"):
        torch.manual_seed(7)
        samples.append(model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=3 * BLOCK, do_sample=True, top_k=5,
            cache_implementation=cache, disable_compile=True,
        ))
    assert torch.equal(*samples)


def test_growing_cache_keeps_only_the_window(models):
    model, _ = models
    output = model(torch.randint(0, 40, (1, 2 * BLOCK)), use_cache=True)
    cache = output.past_key_values
    assert cache.get_seq_length() == 2 * BLOCK  # tokens seen, as transformers counts
    assert all(keys.shape[2] == BLOCK - 1 for keys, _ in cache)


def test_static_cache_holds_block_size_slots_at_most(models):
    model, _ = models
    assert StaticKVCache(model.config, 1, 10 * BLOCK)[0][0].shape[2] == BLOCK
    assert StaticKVCache(model.config, 1, BLOCK - 4)[0][0].shape[2] == BLOCK - 4


def test_compiled_static_decoding_is_one_graph_across_the_wrap(models, padded_prompts):
    model, _ = models
    input_ids, attention_mask = padded_prompts
    counter = CompileCounter()
    options = dict(max_new_tokens=3 * BLOCK, cache_implementation="static")
    eager = model.generate(input_ids, attention_mask=attention_mask, disable_compile=True, **options)
    compiled = model.generate(
        input_ids, attention_mask=attention_mask, compile_config=CompileConfig(backend=counter, mode=None), **options
    )
    assert torch.equal(compiled, eager)
    assert counter.frame_count == 1  # one graph for every step, before and after each wrap
