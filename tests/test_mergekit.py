"""`merge` equals mergekit's slerp of the two exported Hugging Face models, tensor for tensor."""

import pytest
import torch

from picogpt_lightning import PicoGPT
from picogpt_lightning.hf import llama_state_dict, save_pretrained
from picogpt_lightning.merge import slerp_state_dicts

from factories import randomize, tiny_model

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")
from mergekit.config import MergeConfiguration  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

N_LAYER = 4


def random_parent(seed: int, tie_weights: bool) -> PicoGPT:
    """A model whose every weight is random (norm gains too), so no tensor pair is near-parallel by accident."""
    return randomize(tiny_model(seed, block_size=16, n_layer=N_LAYER, tie_weights=tie_weights))


def mergekit_slerp(dir_a, dir_b, out, t) -> dict:
    """mergekit's own slerp of two model directories, as its YAML would say it (first model as base: t = 0)."""
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "slerp",
            "base_model": str(dir_a),
            "slices": [
                {"sources": [{"model": str(d), "layer_range": [0, N_LAYER]} for d in (dir_a, dir_b)]}
            ],
            "parameters": {"t": t},
            "dtype": "float32",
        }
    )
    mergekit_merge.run_merge(config, str(out), options=mergekit_merge.MergeOptions(copy_tokenizer=False))
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


# t as the `merge` command takes it, and as mergekit's YAML writes the same schedule
SCHEDULES = [
    (0.35, 0.35),
    ([0.1, 0.9, 0.4], [0.1, 0.9, 0.4]),
    (
        {"attention": [0.0, 1.0], "mlp": 0.7, "default": [0.2, 0.6]},
        [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": [0.2, 0.6]}],
    ),
]


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("ours, theirs", SCHEDULES, ids=["scalar", "list", "per-kind"])
def test_merge_equals_mergekit_slerp_on_every_tensor(tmp_path, ours, theirs, tie_weights):
    first, second = random_parent(1, tie_weights), random_parent(2, tie_weights)
    save_pretrained(first, tmp_path / "a")
    save_pretrained(second, tmp_path / "b")
    expected = mergekit_slerp(tmp_path / "a", tmp_path / "b", tmp_path / "mergekit", theirs)

    merged = PicoGPT(first.config)
    merged.load_state_dict(slerp_state_dicts(first.state_dict(), second.state_dict(), ours))
    got = llama_state_dict(merged)

    names = set(expected) | ({"lm_head.weight"} if not tie_weights else set())
    assert names <= set(got), sorted(names - set(got))
    for name in sorted(expected):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
