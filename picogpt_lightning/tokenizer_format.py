"""A tokenizer as checkpoints store it, and Hugging Face tokenizer folders read into that form.

The stored form is a dict: the kind, the Rust tokenizer's JSON (its post-processor adds BOS where
the tokenizer does), the special tokens and the chat template. `tokenizer.Tokenizer` turns it into
a tokenizer; this module only reads and writes it, so the checkpoint readers need nothing above it.
"""

from typing import Optional

from picogpt_lightning.errors import UserError, first_line

# This project's tokenizers speak in turns as the corpus's speeches are written ("ROMEO:\n...\n\n"),
# with characters every vocabulary here can encode; an assistant's turn ends with EOS where there is one.
DEFAULT_CHAT_TEMPLATE = (  # newlines as expressions: transformers renders with trim_blocks
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{{ '\\n' }}{% endif %}"
)


def tokenizer_dict(kind: str, tokenizer_json: str, special_tokens: dict, chat_template: Optional[str]) -> dict:
    return {
        "kind": kind,
        "tokenizer_json": tokenizer_json,
        "special_tokens": dict(special_tokens),
        "chat_template": chat_template,
    }


def same_tokens(a: dict, b: dict) -> bool:
    """Whether two stored tokenizers give every text the same ids (the chat template is presentation only)."""
    return all(a.get(key) == b.get(key) for key in ("tokenizer_json", "special_tokens"))


def load_pretrained(name: str):
    """transformers' fast tokenizer of a local folder (or a hub id while online), with a pad token."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise UserError(
            f"cannot load tokenizer {name!r} ({first_line(err)}); use 'char', 'bpe', a local tokenizer "
            "directory, or a Hugging Face hub id while online"
        ) from err
    if not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"tokenizer {name!r} has no fast (Rust) version; pick a tokenizer with a tokenizer.json")
    if hf.pad_token is None and hf.eos_token is not None:
        hf.pad_token = hf.eos_token  # batches need a pad id; padded positions are masked out anyway
    return hf


def pretrained_tokenizer_dict(folder: str) -> dict:
    """The stored form of a Hugging Face tokenizer folder's tokenizer, its own chat template included."""
    hf = load_pretrained(folder)
    template = hf.chat_template if isinstance(hf.chat_template, str) else None
    return tokenizer_dict(folder, hf.backend_tokenizer.to_str(), hf.special_tokens_map, template)
