"""Your own corpus, tokenized once: sources read as documents, cut into sections, written as a token store."""

from picogpt_lightning.corpus.prepare import prepare_store, tokenize_into
from picogpt_lightning.corpus.store import StoreError, TokenStore, is_store

__all__ = ["StoreError", "TokenStore", "is_store", "prepare_store", "tokenize_into"]
