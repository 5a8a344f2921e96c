"""picogpt_lightning.merge: slerp against its formula, schedules over the blocks, the merge command."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.cli import main
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer
from picogpt_lightning.merge import lerp, slerp, slerp_state_dicts
from picogpt_lightning.modules import LanguageModelModule
from factories import randomize, tiny_model
from test_cli_generate import TEXT, train_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def slerp_by_hand(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The formula written out in float64: the angle between the unit directions, applied to the originals."""
    a, b = v0.double().flatten().tolist(), v1.double().flatten().tolist()
    norm_a, norm_b = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    dot = sum(x * y for x, y in zip(a, b)) / (norm_a * norm_b)
    theta = math.acos(dot)
    w0, w1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.tensor([w0 * x + w1 * y for x, y in zip(a, b)], dtype=torch.float64).view(v0.shape)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.83])
def test_slerp_matches_the_formula(t):
    v0, v1 = torch.randn(6, 5), 3 * torch.randn(6, 5)  # different norms: the angle comes from the directions only
    torch.testing.assert_close(slerp(t, v0, v1).double(), slerp_by_hand(t, v0, v1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_t_zero_and_one_give_the_parents_exactly(dtype):
    v0, v1 = torch.randn(8, 4).to(dtype), torch.randn(8, 4).to(dtype)
    assert torch.equal(slerp(0.0, v0, v1), v0) and torch.equal(slerp(1.0, v0, v1), v1)
    assert slerp(0.5, v0, v1).dtype == dtype


def test_bfloat16_is_computed_in_float32():
    v0, v1 = torch.randn(16, 8).bfloat16(), torch.randn(16, 8).bfloat16()
    assert torch.equal(slerp(0.3, v0, v1), slerp(0.3, v0.float(), v1.float()).bfloat16())


@pytest.mark.parametrize("scale", [2.5, -0.5])
def test_colinear_tensors_fall_back_to_linear_interpolation(scale):
    v0 = torch.randn(10)
    v1 = scale * v0  # |cos| = 1: sin(theta) = 0 would divide by zero
    merged = slerp(0.25, v0, v1)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, 0.75 * v0 + 0.25 * v1)


def test_unit_vectors_stay_unit_where_lerp_shrinks_them():
    v0, v1 = torch.nn.functional.normalize(torch.randn(2, 32), dim=1)
    for t in (0.2, 0.5, 0.9):
        assert torch.linalg.vector_norm(slerp(t, v0, v1)).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.linalg.vector_norm(lerp(0.5, v0, v1)).item() < 0.99


# ---- whole models --------------------------------------------------------------------------


MERGE_SIZE = dict(vocab_size=30, block_size=16, n_layer=4, n_embd=16, n_head=2, n_query_groups=None)


def two_models(**overrides):
    """Two models of one architecture with every weight random, norm gains included (they start at 1)."""
    return [randomize(tiny_model(seed, **{**MERGE_SIZE, **overrides})) for seed in (1, 2)]


def test_a_list_is_spread_linearly_over_the_blocks():
    first, second = two_models()  # 4 blocks: block i sits at i / 3
    a, b = first.state_dict(), second.state_dict()
    merged = slerp_state_dicts(a, b, [0.0, 0.6, 0.3])  # points at 0, 1/2, 1: t = 0, 0.4, 0.5, 0.3 for blocks 0..3
    for block, expected_t in enumerate([0.0, 0.4, 0.5, 0.3]):
        for name in (f"blocks.{block}.mlp.down_proj.weight", f"blocks.{block}.attn_norm.weight"):
            torch.testing.assert_close(merged[name], slerp_by_hand(expected_t, a[name], b[name]).float(), rtol=1e-5, atol=1e-6)
        # the fused projection as mergekit merges llama's q_proj, k_proj and v_proj: each with its own angle
        qkv = f"blocks.{block}.attn.qkv.weight"
        parts = [slerp_by_hand(expected_t, x, y).float() for x, y in zip(a[qkv].chunk(3), b[qkv].chunk(3))]
        torch.testing.assert_close(merged[qkv], torch.cat(parts), rtol=1e-5, atol=1e-6)
    # outside the blocks, before or after them, the first value (mergekit 0.1)
    assert torch.equal(merged["tok_embeddings.weight"], a["tok_embeddings.weight"])
    assert torch.equal(merged["norm.weight"], a["norm.weight"])


def test_each_parameter_kind_can_have_its_own_schedule():
    first, second = two_models()
    a, b = first.state_dict(), second.state_dict()
    merged = slerp_state_dicts(a, b, {"attention": 1.0, "mlp": [0.0, 1.0], "default": 0.0})
    for block in range(4):
        assert torch.equal(merged[f"blocks.{block}.attn.proj.weight"], b[f"blocks.{block}.attn.proj.weight"])
        assert torch.equal(merged[f"blocks.{block}.mlp_norm.weight"], a[f"blocks.{block}.mlp_norm.weight"])
        name = f"blocks.{block}.mlp.up_proj.weight"
        torch.testing.assert_close(merged[name], slerp(block / 3, a[name], b[name]))


def test_tied_weights_stay_tied_and_untied_ones_merge_apart():
    first, second = two_models()
    merged = slerp_state_dicts(first.state_dict(), second.state_dict(), 0.5)
    assert merged["lm_head.weight"] is merged["tok_embeddings.weight"]

    first, second = two_models(tie_weights=False)
    a, b = first.state_dict(), second.state_dict()
    merged = slerp_state_dicts(a, b, [0.2, 0.7])
    torch.testing.assert_close(merged["tok_embeddings.weight"], slerp(0.2, a["tok_embeddings.weight"], b["tok_embeddings.weight"]))
    torch.testing.assert_close(merged["lm_head.weight"], slerp(0.2, a["lm_head.weight"], b["lm_head.weight"]))  # first value


@pytest.mark.parametrize(
    "t, message",
    [
        (1.5, "t must hold numbers in [0, 1]"),
        ([], "non-empty list"),
        ({"attn": 0.5, "default": 0.5}, "unknown parameter kind"),
        ({"mlp": 0.5}, "needs a 'default' entry"),
    ],
)
def test_bad_schedules_are_one_line_errors(t, message):
    first, second = two_models()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        slerp_state_dicts(first.state_dict(), second.state_dict(), t)


# ---- the merge command ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two checkpoints as `fit` writes them: one architecture, one tokenizer, different weights."""
    folder = tmp_path_factory.mktemp("parents")
    tokenizer = build_tokenizer("char", TEXT)
    torch.manual_seed(1)
    train_tiny_checkpoint(folder / "a.ckpt", tokenizer)
    torch.manual_seed(2)
    train_tiny_checkpoint(folder / "b.ckpt", tokenizer)
    return str(folder / "a.ckpt"), str(folder / "b.ckpt")


def cli_error(*args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "\n" not in message
    return message


def test_merge_command_writes_a_checkpoint_that_generate_init_from_and_export_read(parents, tmp_path, capsys):
    path_a, path_b = parents
    out = str(tmp_path / "merged.ckpt")
    main(["merge", "--a", path_a, "--b", path_b, "--t", "[0.2, 0.8]", "--out", out])

    first, second = checkpoints.load(path_a), checkpoints.load(path_b)
    expected = slerp_state_dicts(first.state_dict, second.state_dict, [0.2, 0.8])
    merged = PicoGPT.from_checkpoint(out)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert merged.lm_head.weight is merged.tok_embeddings.weight
    embeddings = "tok_embeddings.weight"  # tied: merged once, at the embeddings' place (the first value)
    torch.testing.assert_close(merged.state_dict()[embeddings], slerp(0.2, first.state_dict[embeddings], second.state_dict[embeddings]))
    assert Tokenizer.from_checkpoint(out).to_dict() == first.tokenizer_dict

    capsys.readouterr()
    main(["generate", "--ckpt", out, "--prompt", "to be", "--max_new_tokens", "8"])
    tokenizer = Tokenizer.from_checkpoint(out)
    expected_text = tokenizer.decode(merged.eval().generate(torch.tensor([tokenizer.encode("to be")]), max_new_tokens=8)[0])
    assert capsys.readouterr().out == expected_text + "\n"

    module = LanguageModelModule(first.config, init_from=out)
    module.setup("fit")  # where a run reads init_from
    assert all(torch.equal(module.model.state_dict()[name], tensor) for name, tensor in merged.state_dict().items())

    from transformers import AutoModelForCausalLM

    main(["export", "--ckpt", out, "--out", str(tmp_path / "hf")])
    ids = torch.tensor([tokenizer.encode("to be or")])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, merged(ids).logits)


def test_merge_command_reads_per_kind_schedules_from_yaml(parents, tmp_path):
    path_a, path_b = parents
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"a: {path_a}\nb: {path_b}\nout: {tmp_path / 'merged.ckpt'}\n"
        "t:\n  attention: [0.0, 1.0]\n  mlp: 0.25\n  default: 0.5\n"
    )
    main(["merge", "--config", str(config)])
    a, b = checkpoints.load(path_a).state_dict, checkpoints.load(path_b).state_dict
    merged = checkpoints.load(str(tmp_path / "merged.ckpt")).state_dict
    torch.testing.assert_close(merged["blocks.1.attn.qkv.weight"], b["blocks.1.attn.qkv.weight"])  # last block: 1.0
    torch.testing.assert_close(merged["blocks.0.mlp.gate_proj.weight"], slerp(0.25, a["blocks.0.mlp.gate_proj.weight"], b["blocks.0.mlp.gate_proj.weight"]))
    torch.testing.assert_close(merged["norm.weight"], slerp(0.5, a["norm.weight"], b["norm.weight"]))


def test_mismatched_checkpoints_are_refused(parents, tmp_path):
    path_a, _ = parents
    out = tmp_path / "merged.ckpt"

    tokenizer = Tokenizer.from_checkpoint(path_a)
    wider = tmp_path / "wider.ckpt"
    checkpoints.save(wider, PicoGPT(dataclasses.replace(checkpoints.load(path_a).config, n_embd=48)), tokenizer=tokenizer)
    message = cli_error("merge", "--a", path_a, "--b", str(wider), "--out", str(out))
    assert path_a in message and str(wider) in message and "n_embd 32 vs 48" in message

    other_text = tmp_path / "other_tokenizer.ckpt"
    same_size_other_symbols = build_tokenizer("char", TEXT.replace("q", "Q"))
    checkpoints.save(other_text, PicoGPT.from_checkpoint(path_a), tokenizer=same_size_other_symbols)
    message = cli_error("merge", "--a", path_a, "--b", str(other_text), "--out", str(out))
    assert path_a in message and str(other_text) in message and "different tokenizers" in message

    assert "[0, 1]" in cli_error("merge", "--a", path_a, "--b", path_a, "--t", "1.5", "--out", str(out))
    assert not out.exists()  # nothing written by a refused merge


def test_resuming_from_a_merged_file_points_to_init_from(parents, tmp_path, corpus_path):
    # a merge has no optimizer, schedule or loop state: Lightning's --ckpt_path cannot resume it
    path_a, path_b = parents
    out = str(tmp_path / "merged.ckpt")
    main(["merge", "--a", path_a, "--b", path_b, "--out", out])
    message = cli_error(
        "fit", "--config", str(REPO_ROOT / "configs" / "pretrain_cpu.yaml"), "--ckpt_path", out,
        "--data.init_args.data_path", str(corpus_path), "--trainer.logger", "false",
    )
    assert out in message and f"--model.init_args.init_from {out}" in message
    checkpoints.require_training_state(path_a)  # what `fit` writes resumes
