"""Tiny Hugging Face Llama folders, built and saved by transformers itself: the starting points a user brings."""

from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

# a Llama-style template: BOS once, then turns, an assistant's ending with EOS
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def bpe_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE with <s>, </s> and a post-processor that adds BOS, as Llama's tokenizers do."""
    from transformers import PreTrainedTokenizerFast

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
        chat_template=LLAMA_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def llama_folder(folder, text: str, seed: int = 0, dtype=torch.bfloat16, **overrides) -> Path:
    """A LlamaForCausalLM with llama3 RoPE scaling, head_dim != width / heads, an untied head and attention
    biases, plus its BPE tokenizer, saved by save_pretrained as `dtype` safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer(text)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, attention_bias=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
