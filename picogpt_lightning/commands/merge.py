"""`python -m picogpt_lightning merge`: two checkpoints of one architecture in, their slerp (or lerp) out."""

from typing import Dict, List, Literal, Union

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.outputs import writing_output
from picogpt_lightning.merge import MergeSchedule, check_schedule, lerp, slerp, slerp_state_dicts
from picogpt_lightning.tokenizer import Tokenizer


def merge_checkpoints(path_a: str, path_b: str, out: str, t: MergeSchedule, overwrite: bool = False,
                      interpolate=slerp) -> None:
    """Reads two checkpoints of one architecture and tokenizer, merges them and writes the result.

    The file holds the model config, the tokenizer and the merged weights (`checkpoints.save`),
    so `generate`, `export` and `fit --model.init_args.init_from` read it.
    """
    check_schedule(t)  # before reading two files
    merged_file = lambda path: checkpoints.holds_entry(path, "merged_from")  # noqa: E731
    with writing_output(out, overwrite, inputs=[path_a, path_b], written_here=merged_file):
        write_merge(path_a, path_b, out, t, interpolate)


def write_merge(path_a: str, path_b: str, out: str, t: MergeSchedule, interpolate) -> None:
    first, second = checkpoints.load(path_a), checkpoints.load(path_b)
    for checkpoint in (first, second):
        checkpoints.require_unquantized(checkpoint, "merging (interpolating packed codes is meaningless)")
    config = first.resolve_config()
    differences = checkpoints.architecture_differences(config, second.resolve_config())
    if differences:
        listed = ", ".join(f"{name} {x!r} vs {y!r}" for name, (x, y) in differences.items())
        raise checkpoints.CheckpointError(f"cannot merge {path_a} and {path_b}: their architectures differ ({listed})")
    tokenizer_dict = first.require_tokenizer_dict()
    if second.require_tokenizer_dict() != tokenizer_dict:
        raise checkpoints.CheckpointError(
            f"cannot merge {path_a} and {path_b}: they use different tokenizers, so the same id means different text"
        )
    model = PicoGPT(config)
    for checkpoint in (first, second):  # a one-line error for weights that do not fit their own config
        checkpoint.load_weights(model)
    model.load_state_dict(slerp_state_dicts(first.state_dict, second.state_dict, t, interpolate))
    checkpoints.save(out, model, Tokenizer.from_dict(tokenizer_dict), merged_from=[path_a, path_b], merge_t=t)


def merge(
    a: str,
    b: str,
    out: str,
    t: Union[float, List[float], Dict[str, Union[float, List[float]]]] = 0.5,
    method: Literal["slerp", "linear"] = "slerp",
    overwrite: bool = False,
) -> None:
    """Merge two checkpoints of one architecture and tokenizer into one (slerp, as mergekit does it).

    Args:
        a: the first checkpoint (t = 0).
        b: the second checkpoint (t = 1), same architecture and tokenizer as a.
        out: the merged checkpoint to write (config, tokenizer and weights; generate, export and fit's init_from read it).
        t: how far from a towards b: a number; a list spread over the blocks (first value at block 0, last at the last block; the weights outside the blocks take the first, as in mergekit); or a dict of those per kind, {"attention": ..., "mlp": ..., "default": ...}. Per-kind schedules read best from a YAML file given with --config.
        method: "slerp" (spherical) or "linear" (plain (1 - t) a + t b, for comparison).
        overwrite: replace out if it is an earlier merge (never another kind of file).
    """
    merge_checkpoints(a, b, out, t, overwrite=overwrite, interpolate=slerp if method == "slerp" else lerp)
    print(f"wrote {out}: {method} of {a} (t = 0) and {b} (t = 1) at t = {t}")
