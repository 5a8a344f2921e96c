"""Data: finding the corpus, batching, Tiny Shakespeare, token stores of any corpus, and prompt/completion data for SFT and DPO."""

from picogpt_lightning.data.collate import PadCollator
from picogpt_lightning.data.prompt_completion import InstructionDataModule, PreferenceDataModule
from picogpt_lightning.data.shakespeare import TinyShakespeareDataModule
from picogpt_lightning.data.source import DataSourceError, find_corpus
from picogpt_lightning.data.token_store import TokenStoreDataModule
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "DataSourceError",
    "InstructionDataModule",
    "PadCollator",
    "PreferenceDataModule",
    "TinyShakespeareDataModule",
    "TokenStoreDataModule",
    "Tokenizer",
    "build_tokenizer",
    "find_corpus",
]
