"""Data: finding the corpus, tokenizers, batching, and the Tiny Shakespeare LightningDataModule."""

from picogpt_lightning.data.collate import PadCollator
from picogpt_lightning.data.shakespeare import TinyShakespeareDataModule
from picogpt_lightning.data.source import DataSourceError, find_corpus
from picogpt_lightning.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["DataSourceError", "PadCollator", "TinyShakespeareDataModule", "Tokenizer", "build_tokenizer", "find_corpus"]
