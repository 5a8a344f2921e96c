"""int8/int4 weight-only layers and packed BitNet on torch's CPU kernels: codes against torchao's formulas,
each layer against its dequantized weight, each packed model against its reference (logits within a stated
tolerance, greedy tokens identical), and the static compiled decode step compiled once for every format."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig

from picogpt_lightning import PicoGPT
from picogpt_lightning.errors import UserError
from picogpt_lightning.quant import nf4_kernel
from picogpt_lightning.quant import (
    BitLinear, Int4WeightLinear, Int8WeightLinear, NF4Linear, PackedBitLinear, pack_bitnet, quantize_int4,
    quantize_int8, quantize_nf4,
)
from picogpt_lightning.tokenizer import Tokenizer
from factories import tiny_model
from test_quant import PACK, bitnet_checkpoint, fp_checkpoint, linear_with, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

DEQUANTIZABLE = (NF4Linear, Int8WeightLinear, Int4WeightLinear)
PARITY_PROMPTS = ["to be", "whether 'tis", "that is the"]
# max |logit difference| allowed against the reference: NF4's kernel sums in float32 in its own order; the others take
# bfloat16 activations and round their sums to bfloat16 (8 significant bits), which BitNet's activation
# rounding and RMS norms amplify from layer to layer
LOGIT_TOLERANCE = {"nf4": 1e-4, "int8": 0.02, "int4": 0.02, "bitnet": 0.1}


def test_int8_codes_and_scales_are_torchaos_symmetric_per_channel_quantization():
    quant = pytest.importorskip("torchao.quantization.quant_primitives")
    weight = torch.randn(48, 64) * torch.rand(48, 1)
    layer = Int8WeightLinear.from_linear(linear_with(weight))
    scale, _ = quant.choose_qparams_affine(
        weight, quant.MappingType.SYMMETRIC, (1, 64), torch.int8, -128, 127, eps=torch.finfo(torch.float32).eps,
    )
    assert torch.equal(layer.scales, scale.flatten().to(torch.bfloat16))  # stored as the kernel reads them
    expected = torch.clamp(torch.round(weight / layer.scales.float()[:, None]), -128, 127)
    assert torch.equal(layer.weight_int8.float(), expected)


def test_int4_codes_scales_and_zeros_are_torchaos_tinygemm_quantization():
    utils = pytest.importorskip("torchao.quantization.utils")
    weight = torch.randn(32, 128)
    layer = Int4WeightLinear.from_linear(linear_with(weight), group_size=32)
    scales, zeros = utils.get_groupwise_affine_qparams(weight, n_bit=4, groupsize=32, dtype=torch.bfloat16)
    codes = utils.groupwise_affine_quantize_tensor_from_qparams(weight, scales, zeros, n_bit=4, groupsize=32)
    assert torch.equal(layer.scales_and_zeros[..., 0], scales.t()) and torch.equal(layer.scales_and_zeros[..., 1], zeros.t())
    assert torch.equal(layer.codes().long(), codes.long())
    # the dequantized weight is gpt-fast's (q - 8) * s + z: within half a step of the original, plus the
    # rounding of the group's minimum z - 8 s to bfloat16 (torchao rounds it so)
    step, minimum = (t.float().repeat_interleave(32, 1) for t in (scales, zeros - 8 * scales))
    assert ((layer.dequantize() - weight).abs() <= step / 2 + minimum.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("layer_type", [Int8WeightLinear, Int4WeightLinear])
def test_kernel_layer_is_a_linear_of_bfloat16_activations_with_the_dequantized_weight(layer_type):
    layer = layer_type.from_linear(nn.Linear(64, 48, bias=True))
    x = torch.randn(3, 5, 64)
    # the kernel's sums are float32 sums of bfloat16 activations times the exact weights, rounded to bfloat16
    sums = F.linear(x.bfloat16().float(), layer.dequantize()).bfloat16().float()
    out = layer(x) - layer.bias
    assert (out == sums).float().mean() > 0.9  # most round the same way; the kernel sums in its own order
    torch.testing.assert_close(out, sums, rtol=2**-7, atol=0)  # the others by one bfloat16 step


@pytest.mark.parametrize("in_features, out_features, block_size", [(384, 64, 64), (32, 48, 64), (48, 32, 16), (40, 16, 64)])
def test_nf4_kernel_is_a_linear_with_the_dequantized_weight(in_features, out_features, block_size):
    """(32, 48, 64): blocks run across rows; (40, ...): no 16-column chunks, so F.linear on the dequantized weight."""
    layer = NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=True), block_size=block_size)
    assert layer.fused == (in_features % 16 == 0)  # a shape question: the kernel is built on the first matmul
    for rows in (1, 8, nf4_kernel.MAX_ROWS + 1):  # past MAX_ROWS: dequantize + F.linear
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-6)


NO_COMPILER_SCRIPT = """
import torch, torch.nn.functional as F
from torch import nn
from picogpt_lightning.quant import NF4Linear, nf4_kernel
layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=True))
assert nf4_kernel.library.cache_info().currsize == 0  # nothing built at construction
x = torch.randn(1, 64)
torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-6)
assert not nf4_kernel.available()
"""


def test_without_a_compiler_nf4_dequantizes_and_the_cache_keeps_nothing_partial(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "picogpt_lightning"
    assert not cache.exists() or [path.name for path in cache.iterdir()] == ["nf4_kernel.lock"]  # no library, no half-built one


@pytest.mark.parametrize("kind", ["bitnet1.58", "bitnet1"])
def test_packed_bitnet_layer_is_the_exact_integer_sum_rounded_to_bfloat16(kind):
    layer = BitLinear(64, 48, kind=kind)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(4, 64)
    x_n = F.rms_norm(x, (64,), eps=1e-6)
    step = 127 / x_n.abs().amax(dim=-1, keepdim=True)
    levels = torch.clamp(torch.round(x_n * step), -128, 127)
    w, s = layer.weight.detach(), layer.weight.detach().abs().mean()
    codes = torch.clamp(torch.round(w / s), -1, 1) if kind == "bitnet1.58" else torch.sign(w - w.mean())
    assert torch.equal(packed.codes(), codes)
    exact = levels.double() @ codes.double().T  # integers: exact in float64
    torch.testing.assert_close(packed(x), exact.to(torch.bfloat16).float() * (s / step), rtol=1e-6, atol=1e-7)


def reference_and_packed(method: str, source: str):
    """The packed model and its reference: the dequantized weights through F.linear (NF4, int8, int4), or
    the training model's own fake-quantized forward (BitNet)."""
    reference = PicoGPT.from_checkpoint(source).eval()
    packed = PACK[method](copy.deepcopy(reference)).eval()
    for name, layer in packed.named_modules():
        if isinstance(layer, DEQUANTIZABLE):
            reference.get_submodule(name).weight.data.copy_(layer.dequantize())
    return reference, packed


@pytest.mark.parametrize("method", ["nf4", "int8", "int4", "bitnet"])
def test_packed_logits_and_greedy_tokens_match_the_reference(method, fp_checkpoint, bitnet_checkpoint):
    source = bitnet_checkpoint if method == "bitnet" else fp_checkpoint
    reference, packed = reference_and_packed(method, source)
    tokenizer = Tokenizer.from_checkpoint(source)
    input_ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (packed(input_ids).logits - reference(input_ids).logits).abs().max().item()
    assert difference <= LOGIT_TOLERANCE[method]
    for prompt in PARITY_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        assert torch.equal(packed.generate(ids, max_new_tokens=20), reference.generate(ids, max_new_tokens=20)), prompt


@pytest.mark.parametrize("method", ["nf4", "int8", "int4", "bitnet1.58", "bitnet1"])
def test_static_compiled_decoding_compiles_once_for_every_format(method):
    torch._dynamo.reset()
    linear = method if method.startswith("bitnet") else "linear"
    model = PACK["bitnet" if method.startswith("bitnet") else method](tiny_model(linear=linear))
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    counter = CompileCounter()
    options = dict(max_new_tokens=12, cache_implementation="static", compile_config=CompileConfig(backend=counter, mode=None))
    eager = model.generate(prompt, max_new_tokens=12)
    first = model.generate(prompt, **options)
    assert counter.frame_count == 1  # fullgraph=True: a graph break would have raised; 11 steps, one graph
    second = model.generate(prompt, **options)
    assert counter.frame_count == 1 and torch.equal(first, eager) and torch.equal(second, eager)
    torch._dynamo.reset()


def test_int_formats_refuse_bitnet_layers_ties_and_shapes_their_kernel_cannot_hold():
    with pytest.raises(UserError, match="BitNet layer: .* not int8"):
        quantize_int8(tiny_model(linear="bitnet1.58"))
    with pytest.raises(UserError, match="tied weights"):
        quantize_int4(tiny_model(), skip=())
    with pytest.raises(UserError, match="out_features 40 is not a multiple of 16"):
        Int4WeightLinear.from_linear(nn.Linear(64, 40))
    with pytest.raises(UserError, match="group size must be one of"):
        Int4WeightLinear(64, 48, group_size=48)
    with pytest.raises(UserError, match="BitNet layer: .* not NF4"):
        quantize_nf4(tiny_model(linear="bitnet1"))
    assert isinstance(pack_bitnet(tiny_model(linear="bitnet1")).blocks[0].attn.qkv, PackedBitLinear)
