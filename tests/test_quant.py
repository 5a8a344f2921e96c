"""Quantization: NF4 against bitsandbytes and the written-out codebook, BitLinear against BitNet's
formulas, packed files that reload exactly, and `quantize` then `generate` through the CLI
(the int8/int4 kernels and the compiled decode path: test_quant_kernels.py)."""

import copy

import pytest
import torch
from torch import nn

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.checkpoints import CheckpointError
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer
from picogpt_lightning.quant import (
    BitLinear, NF4Linear, PackedBitLinear, pack_bitnet, quantize_int4, quantize_int8, quantize_nf4,
)
from picogpt_lightning.quant.bitnet import pack_codes, unpack_codes
from picogpt_lightning.commands.quantize import quantize_checkpoint
from picogpt_lightning.quant.nf4 import DYNAMIC_CODE, pack_nibbles, unpack_nibbles
from factories import tiny_config
from test_cli_generate import TEXT, run_cli, train_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

# QLoRA's NF4 values (bitsandbytes.functional.get_4bit_type("nf4")), written out here on purpose
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def linear_with(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight.data.copy_(weight)
    return layer


# ---- NF4 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 40), (37, 29)])  # the second ends in a short block and an odd count
def test_nf4_equals_bitsandbytes(shape, double_quant):
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(shape) * 0.05
    layer = NF4Linear.from_linear(linear_with(weight), block_size=64, double_quant=double_quant)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(layer.packed, packed.flatten())  # same codes in the same nibbles
    assert torch.equal(DYNAMIC_CODE, bnb.create_dynamic_map())
    if double_quant:
        assert torch.equal(layer.absmax_offset, state.offset) and torch.equal(layer.absmax_scales, state.state2.absmax)
        # bitsandbytes' compiled CPU kernel finds the 8-bit code by binary search, which in rare near-ties
        # lands on the neighbour of the nearest value; its pure-torch backend, and this package, take the nearest
        absmax = weight.reshape(-1).split(64)
        centred = torch.stack([block.abs().max() for block in absmax]) - state.offset
        scaled = centred / state.state2.absmax.repeat_interleave(256)[: len(centred)]
        ours, theirs = layer.absmax_codes.long(), state.absmax.long()
        closer = (DYNAMIC_CODE[ours] - scaled).abs() <= (DYNAMIC_CODE[theirs] - scaled).abs()
        assert ((ours == theirs) | (((ours - theirs).abs() == 1) & closer)).all()
        state.absmax = layer.absmax_codes  # bitsandbytes decodes our codes exactly as we do
    assert torch.equal(layer.dequantize(), bnb.dequantize_4bit(packed, state))


def test_nf4_is_the_nearest_code_of_each_block_absmax_scaled_weight():
    weight = torch.randn(24, 40)
    layer = NF4Linear.from_linear(linear_with(weight), block_size=64, double_quant=False)
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(NF4_VALUES).abs().argmin(dim=-1)
    expected = NF4_VALUES[nearest] * absmax
    torch.testing.assert_close(layer.dequantize(), expected.reshape(24, 40), rtol=1e-6, atol=0)
    assert layer.packed.numel() == weight.numel() // 2 and layer.packed.dtype == torch.uint8


def test_packing_is_lossless():
    codes = torch.randint(0, 16, (101,), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 101), codes)
    for bits in (1, 2):
        codes = torch.randint(0, 2**bits, (77,), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == -(-77 * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, 77), codes)


def test_double_quantized_absmax_stays_within_half_a_code_step():
    weight = torch.randn(64, 600) * torch.rand(64, 1) * 3  # blocks of very different scales
    exact = NF4Linear.from_linear(linear_with(weight), block_size=64, double_quant=False)
    double = NF4Linear.from_linear(linear_with(weight), block_size=64, double_quant=True)
    absmax = exact.block_absmax()
    centred = absmax - absmax.mean()
    # each 256-block of centred constants scales the 8-bit dynamic code; rounding to its nearest value
    # moves a constant by at most half the widest gap between neighbouring codes, times that block's absmax
    block_scale = centred.abs().reshape(-1).split(256)
    bound = torch.cat([chunk.max().expand(len(chunk)) for chunk in block_scale]) * DYNAMIC_CODE.diff().max() / 2
    error = (double.block_absmax() - absmax).abs()
    assert (error <= bound * (1 + 1e-6)).all()
    assert double.absmax_codes.dtype == torch.uint8 and double.absmax_scales.numel() == -(-absmax.numel() // 256)


def test_nf4_model_logits_equal_the_model_with_dequantized_weights():
    model = PicoGPT(tiny_config()).eval()
    quantized = quantize_nf4(copy.deepcopy(model))
    nf4_layers = {name: m for name, m in quantized.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4_layers) == 2 * 5  # qkv, proj, gate, up, down in each block
    assert type(quantized.lm_head) is nn.Linear and quantized.lm_head.weight is quantized.tok_embeddings.weight
    reference = copy.deepcopy(model)
    for name, layer in nf4_layers.items():
        reference.get_submodule(name).weight.data.copy_(layer.dequantize())
    input_ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids).logits, reference(input_ids).logits)
        assert next(iter(nf4_layers.values())).dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_quantize_nf4_refuses_to_break_tied_weights_and_bitnet_layers():
    with pytest.raises(ValueError, match="tied weights"):
        quantize_nf4(PicoGPT(tiny_config()), skip=())
    with pytest.raises(ValueError, match="BitNet layer"):
        quantize_nf4(PicoGPT(tiny_config(linear="bitnet1.58")))


# ---- BitNet --------------------------------------------------------------------------------


def bitnet_reference(x: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """BitNet's forward written out: RMS norm without gain, 8-bit absmax activations, ternary or binary weights."""
    x_n = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    gamma = x_n.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    a = torch.clamp(torch.round(x_n * 127 / gamma), -128, 127) * gamma / 127
    s = weight.abs().mean()
    if kind == "bitnet1.58":
        w = torch.clamp(torch.round(weight / s), -1, 1) * s
    else:
        w = torch.sign(weight - weight.mean()) * s
    return a @ w.T


@pytest.mark.parametrize("kind", ["bitnet1.58", "bitnet1"])
def test_bitlinear_forward_is_the_bitnet_formula_and_gradients_reach_the_latent_weights(kind):
    layer = BitLinear(48, 24, kind=kind)
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, bitnet_reference(x.detach(), layer.weight.detach(), kind))

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # straight-through: dL/dW is that of linear(a, W), with a the quantized activations
    x_n = x.detach() / torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    gamma = x_n.abs().amax(-1, keepdim=True)
    a = torch.clamp(torch.round(x_n * 127 / gamma), -128, 127) * gamma / 127
    torch.testing.assert_close(layer.weight.grad, grad_out.reshape(-1, 24).T @ a.reshape(-1, 48))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bitnet_model_keeps_embeddings_and_lm_head_in_full_precision_and_compiles_without_graph_breaks():
    model = PicoGPT(tiny_config(linear="bitnet1.58"))
    bit_layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(bit_layers) == 2 * 5
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.tok_embeddings.weight
    input_ids = torch.randint(0, 40, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    compiled(input_ids).logits.sum().backward()
    assert all(m.weight.grad is not None for m in bit_layers)
    with pytest.raises(ValueError, match="linear must be one of"):
        PicoGPTConfig(linear="bitnet2")


@pytest.mark.parametrize("kind, bits", [("bitnet1.58", 2), ("bitnet1", 1)])
def test_packed_bitnet_gives_the_training_logits_up_to_bfloat16_sums(kind, bits):
    model = PicoGPT(tiny_config(linear=kind)).eval()
    packed = pack_bitnet(copy.deepcopy(model))
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    assert len(layers) == 2 * 5 and not any(isinstance(m, BitLinear) for m in packed.modules())
    qkv = packed.blocks[0].attn.qkv
    assert packed.state_dict()["blocks.0.attn.qkv.packed"].numel() == qkv.in_features * qkv.out_features * bits // 8
    input_ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        # the kernel rounds each layer's integer sums to bfloat16 (8 significant bits): ~0.4% per layer
        torch.testing.assert_close(packed(input_ids).logits, model(input_ids).logits, rtol=0, atol=0.05)


# ---- packed files and the CLI --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char", TEXT)


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("fp") / "tiny.ckpt"
    train_tiny_checkpoint(path, tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def bitnet_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bitnet") / "tiny.ckpt"
    train_tiny_checkpoint(path, tokenizer, linear="bitnet1.58")
    return str(path)


def test_packed_bitnet_checkpoint_reloads_as_the_packed_model(bitnet_checkpoint, tmp_path):
    out = tmp_path / "packed.pt"
    quantize_checkpoint(bitnet_checkpoint, out, "bitnet")
    expected = pack_bitnet(PicoGPT.from_checkpoint(bitnet_checkpoint)).eval()
    reloaded = PicoGPT.from_checkpoint(out).eval()
    assert isinstance(reloaded.blocks[0].mlp.up_proj, PackedBitLinear)
    input_ids = torch.randint(0, expected.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected(input_ids).logits)


def test_nf4_checkpoint_reloads_as_the_quantized_model(fp_checkpoint, tmp_path):
    out = tmp_path / "nf4.pt"
    quantize_checkpoint(fp_checkpoint, out, "nf4")
    expected = quantize_nf4(PicoGPT.from_checkpoint(fp_checkpoint)).eval()
    reloaded = PicoGPT.from_checkpoint(out).eval()
    assert isinstance(reloaded.blocks[1].attn.qkv, NF4Linear)
    assert reloaded.lm_head.weight is reloaded.tok_embeddings.weight
    input_ids = torch.randint(0, expected.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected(input_ids).logits)


PACK = {"nf4": quantize_nf4, "int8": quantize_int8, "int4": quantize_int4, "bitnet": pack_bitnet}


@pytest.mark.parametrize("method", ["nf4", "int8", "int4", "bitnet"])
def test_quantize_then_generate_through_the_cli(method, fp_checkpoint, bitnet_checkpoint, tmp_path, capsys):
    source = bitnet_checkpoint if method == "bitnet" else fp_checkpoint
    out = str(tmp_path / f"{method}.pt")
    assert f"wrote {out}" in run_cli(capsys, "quantize", "--ckpt", source, "--method", method, "--out", out)
    text = run_cli(capsys, "generate", "--ckpt", out, "--prompt", "to be", "--max_new_tokens", "16")
    # the packed file generates what the in-memory quantized model generates
    model = PACK[method](PicoGPT.from_checkpoint(source)).eval()
    tokenizer = Tokenizer.from_checkpoint(out)
    expected = model.generate(torch.tensor([tokenizer.encode("to be")]), max_new_tokens=16)[0]
    assert text == tokenizer.decode(expected) + "\n"


def expect_cli_error(capsys, message, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, *args)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_quantize_refuses_quantized_and_foreign_checkpoints(fp_checkpoint, bitnet_checkpoint, tmp_path, capsys):
    packed = str(tmp_path / "packed.pt")
    run_cli(capsys, "quantize", "--ckpt", fp_checkpoint, "--method", "nf4", "--out", packed)
    again = str(tmp_path / "again.pt")
    expect_cli_error(capsys, "is already quantized ('nf4')", "quantize", "--ckpt", packed, "--method", "nf4", "--out", again)
    expect_cli_error(capsys, "not BitNet; use --method nf4, int8 or int4", "quantize", "--ckpt", fp_checkpoint, "--method", "bitnet", "--out", again)
    for method in ("nf4", "int8", "int4"):
        expect_cli_error(capsys, "pack it with --method bitnet", "quantize", "--ckpt", bitnet_checkpoint, "--method", method, "--out", again)
    expect_cli_error(
        capsys, "--group_size must be one of", "quantize", "--ckpt", fp_checkpoint, "--method", "int4", "--group_size", "48",
        "--out", again,
    )
    expect_cli_error(capsys, "already exists", "quantize", "--ckpt", fp_checkpoint, "--method", "nf4", "--out", packed)
    bare = tmp_path / "bare.pt"
    torch.save(PicoGPT(tiny_config()).state_dict(), bare)
    expect_cli_error(capsys, "holds no model config", "quantize", "--ckpt", str(bare), "--method", "nf4", "--out", again)
    assert not (tmp_path / "again.pt").exists()
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(packed, tmp_path / "x.pt", "bitnet")


def test_packed_files_are_refused_for_training_merging_and_export(fp_checkpoint, tmp_path):
    from picogpt_lightning.commands.export import export_checkpoint
    from picogpt_lightning.commands.merge import merge_checkpoints
    from picogpt_lightning.modules import LanguageModelModule

    packed = tmp_path / "nf4.pt"
    quantize_checkpoint(fp_checkpoint, packed, "nf4")
    config = PicoGPT.from_checkpoint(fp_checkpoint).config
    with pytest.raises(CheckpointError, match="already quantized .* init_from"):
        LanguageModelModule(config, init_from=str(packed)).setup("fit")
    with pytest.raises(CheckpointError, match="already quantized .* merging"):
        merge_checkpoints(fp_checkpoint, str(packed), str(tmp_path / "merged.ckpt"), 0.5)
    assert not (tmp_path / "merged.ckpt").exists()
    with pytest.raises(CheckpointError, match="already quantized .* Hugging Face export"):
        export_checkpoint(str(packed), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
