"""`export --format gguf` against llama.cpp itself (llama-cpp-python): its tokenizer gives the project's ids,
its greedy decoding the project's tokens, for a character and a byte-level BPE model; and one-line refusals
for what GGUF cannot express."""

import numpy as np
import pytest
import torch

from picogpt_lightning import PicoGPT
from picogpt_lightning.commands.export import export_gguf
from picogpt_lightning.commands.quantize import quantize_checkpoint
from picogpt_lightning.gguf_export import rotary_permute
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer
from test_cli_generate import TEXT, run_cli, train_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

PARITY_PROMPTS = ["to be", "whether 'tis", "that is the", "to be, or not\n"]
NEW_TOKENS = 48
BLOCK_SIZE = 64  # the longest prompt plus 48 new tokens fits: llama.cpp and the project see the same context


def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp: pip install llama-cpp-python)"
    )


@pytest.fixture(scope="module", params=["char", "bpe"])
def checkpoint(request, tmp_path_factory, corpus_path):
    if request.param == "char":
        tokenizer = build_tokenizer("char", TEXT)
    else:
        tokenizer = build_tokenizer("bpe", corpus_path.read_text()[:100_000], vocab_size=300)
    path = tmp_path_factory.mktemp(request.param) / "tiny.ckpt"
    torch.manual_seed(0)  # the same model whichever tests ran before in this worker
    train_tiny_checkpoint(path, tokenizer, block_size=BLOCK_SIZE)
    return str(path)


def greedy_llama_cpp(path: str, prompt_ids: list) -> list:
    model = llama_cpp().Llama(path, n_ctx=BLOCK_SIZE, n_threads=1, verbose=False)
    tokens = []
    for token in model.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == NEW_TOKENS:
            break
    return tokens


def greedy_project(model: PicoGPT, prompt_ids: list) -> list:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_tokenizes_and_decodes_as_the_project(checkpoint, gguf_type, tmp_path):
    llama = llama_cpp()
    path = str(tmp_path / f"model.{gguf_type}.gguf")
    export_gguf(checkpoint, path, gguf_type=gguf_type)
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    if gguf_type == "f16":  # the weights the file holds: its matrices in half precision, norms in float32
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.data = parameter.data.half().float()
    vocab_only = llama.Llama(path, vocab_only=True, verbose=False)
    agree = total = 0
    for prompt in PARITY_PROMPTS:
        ids = tokenizer.encode(prompt)
        assert vocab_only.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        assert vocab_only.detokenize(ids).decode() == prompt
        ours, theirs = greedy_project(model, ids), greedy_llama_cpp(path, ids)
        if gguf_type == "q8_0":
            agree += sum(a == b for a, b in zip(ours, theirs))
            total += NEW_TOKENS
        else:
            assert theirs == ours, prompt
    if gguf_type == "q8_0":
        assert agree >= 0.9 * total


def test_a_packed_checkpoint_exports_its_dequantized_weights(checkpoint, tmp_path):
    llama_cpp()
    packed = str(tmp_path / "int8.pt")
    quantize_checkpoint(checkpoint, packed, "int8")
    export_gguf(packed, str(tmp_path / "int8.gguf"), gguf_type="f32")
    ids = Tokenizer.from_checkpoint(checkpoint).encode("whether 'tis")
    # int8's kernel rounds activations to bfloat16; the dequantized weights in float32 are what GGUF holds
    reference = PicoGPT.from_checkpoint(checkpoint).eval()
    for name, layer in PicoGPT.from_checkpoint(packed).named_modules():
        if hasattr(layer, "dequantize"):
            reference.get_submodule(name).weight.data.copy_(layer.dequantize())
    assert greedy_llama_cpp(str(tmp_path / "int8.gguf"), ids) == greedy_project(reference, ids)


def test_rotary_permute_pairs_each_heads_halves():
    rows = np.arange(2 * 8, dtype=np.float32).reshape(2 * 8, 1)  # 2 heads of 8 rows: halves [0..3 | 4..7]
    permuted = rotary_permute(rows, heads=2).ravel().tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize(("overrides", "named"), [
    ({"linear": "bitnet1.58"}, "linear='bitnet1.58' has no Llama equivalent"),
    ({"mlp": "gelu"}, "mlp='gelu' has no Llama equivalent"),
])
def test_what_gguf_cannot_express_is_one_line_and_writes_nothing(tmp_path, capsys, overrides, named):
    path = tmp_path / "model.ckpt"
    train_tiny_checkpoint(path, build_tokenizer("char", TEXT), **overrides)
    out = tmp_path / "model.gguf"
    with pytest.raises(SystemExit) as refused:
        run_cli(capsys, "export", "--ckpt", str(path), "--out", str(out), "--format", "gguf")
    assert named in str(refused.value.code) and "\n" not in str(refused.value.code)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
