"""Tokenizers: nanoGPT's char vocabulary, trained byte-level BPE, HF tokenizers, and their serialisations."""

import json

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer

# nanoGPT's shakespeare_char vocabulary, in id order (its prepare.py prints it)
NANOGPT_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def text(corpus_path):
    return corpus_path.read_text()


@pytest.fixture(scope="module")
def char(text):
    return build_tokenizer("char", text)


@pytest.fixture(scope="module")
def bpe(text):
    return build_tokenizer("bpe", text[:200_000], vocab_size=512)


@pytest.fixture(scope="module")
def sample(text):
    return text[500_000:510_000]


def test_char_vocabulary_is_nanogpts(char, text):
    assert char.kind == "char"
    assert char.vocab_size == 65
    assert "".join(sorted(set(text))) == NANOGPT_CHARS
    stoi = {c: i for i, c in enumerate(NANOGPT_CHARS)}
    assert char.hf.get_vocab() == stoi
    assert char.encode("First Citizen:\nBefore we") == [stoi[c] for c in "First Citizen:\nBefore we"]
    assert char.encode("\n \n") == [0, 1, 0]
    assert char.pad_token_id is None and char.eos_token_id is None


def test_char_round_trip_is_exact_on_the_whole_corpus(char, text):
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert char.decode(ids) == text
    assert char.decode(torch.tensor(ids[:100])) == text[:100]


def test_char_rejects_unknown_characters_by_name(char):
    with pytest.raises(ValueError, match="'é'") as info:
        char.encode("Café au lait")
    assert "\n" not in str(info.value)


def test_bpe_round_trip_is_exact_on_the_whole_corpus(bpe, text):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 512
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < 0.6 * len(text)  # 255 merges learnt: it does compress
    assert max(ids) < bpe.vocab_size


def test_bpe_end_of_text_is_eos_and_pad(bpe):
    eos = bpe.hf.convert_tokens_to_ids("<|endoftext|>")
    assert bpe.eos_token_id == bpe.pad_token_id == eos
    assert bpe.decode(bpe.encode("To be") + [eos]) == "To be<|endoftext|>"
    assert eos not in bpe.encode("To be, or not to be")  # encode adds no special tokens


def test_bpe_encodes_text_it_never_saw(bpe):
    unseen = "Café – 東京 🙂\t\r\n"
    assert bpe.decode(bpe.encode(unseen)) == unseen


@pytest.mark.parametrize(
    ("kind", "text", "vocab_size", "match"),
    [
        ("bpe", "some text", None, "vocab_size >= 257"),
        ("bpe", "some text", 100, "vocab_size >= 257"),
        ("bpe", None, 512, "text="),
        ("char", "", None, "text="),
        ("char", "abc", 10, "only to the 'bpe'"),
        ("", None, None, "tokenizer kind"),
    ],
)
def test_bad_build_arguments_are_one_line_errors(kind, text, vocab_size, match):
    with pytest.raises(ValueError, match=match) as info:
        build_tokenizer(kind, text=text, vocab_size=vocab_size)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_to_dict_from_dict_gives_the_same_tokenizer(name, request, sample):
    tokenizer = request.getfixturevalue(name)
    restored = Tokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored.kind == tokenizer.kind
    assert restored.encode(sample) == tokenizer.encode(sample)
    assert restored.decode(tokenizer.encode(sample)) == sample
    assert (restored.vocab_size, restored.pad_token_id, restored.eos_token_id) == (
        tokenizer.vocab_size,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )


def test_from_dict_names_missing_keys():
    with pytest.raises(ValueError, match="tokenizer_json"):
        Tokenizer.from_dict({"kind": "char", "special_tokens": {}})


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_save_load_and_auto_tokenizer_agree(name, request, sample, tmp_path):
    tokenizer = request.getfixturevalue(name)
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == name
    assert loaded.encode(sample) == tokenizer.encode(sample)

    auto = AutoTokenizer.from_pretrained(tmp_path)  # what a transformers user would do
    ids = auto.encode(sample, add_special_tokens=False)
    assert ids == tokenizer.encode(sample)
    assert auto.decode(ids, clean_up_tokenization_spaces=False) == sample
    assert (auto.pad_token_id, auto.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.load(tmp_path / "missing")


def test_hf_tokenizer_from_a_local_directory(bpe, sample, tmp_path):
    bpe.hf.save_pretrained(tmp_path)  # plain HF files, as any other HF tokenizer directory
    hf_kind = build_tokenizer(str(tmp_path))
    assert hf_kind.kind == str(tmp_path)
    assert isinstance(hf_kind.hf, PreTrainedTokenizerFast)
    assert hf_kind.encode(sample) == bpe.encode(sample)
    assert hf_kind.decode(hf_kind.encode(sample)) == sample
    assert hf_kind.vocab_size == 512


def test_hf_tokenizer_without_pad_pads_with_eos(tmp_path):
    backend = BackendTokenizer(models.WordLevel({"<eos>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(tmp_path)
    tokenizer = build_tokenizer(str(tmp_path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert tokenizer.encode("hi there") == [1, 2]


def test_hf_tokenizer_that_cannot_load_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer") as info:
        build_tokenizer(str(tmp_path / "no_such_tokenizer"))
    assert "\n" not in str(info.value)


def test_from_checkpoint(bpe, sample, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "picogpt_tokenizer": bpe.to_dict()}, path)
    assert Tokenizer.from_checkpoint(path).encode(sample) == bpe.encode(sample)


def test_from_checkpoint_errors(tmp_path):
    without = tmp_path / "without.ckpt"
    torch.save({"state_dict": {}}, without)
    with pytest.raises(ValueError, match="picogpt_tokenizer"):
        Tokenizer.from_checkpoint(without)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint") as info:
        Tokenizer.from_checkpoint(garbage)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        Tokenizer.from_checkpoint(tmp_path / "absent.ckpt")
