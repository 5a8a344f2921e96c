"""Command line: LightningCLI for fit/validate/test/predict, plus the project's own commands.

    python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml
    python -m picogpt_lightning <command> --help

Training subcommands go to LightningCLI. The other commands are plain functions registered
with `@command`: jsonargparse turns each one's signature and docstring into its flags, so a
new command is one function here and nothing else.
"""

import os
import sys
from typing import Callable, Dict, List, Literal, Optional, Union

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a model (python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml)",
    "validate": "run one evaluation over the validation set",
    "test": "run one evaluation over the test set",
    "predict": "run inference over the predict set",
}
COMMANDS: Dict[str, Callable] = {}


def command(function: Callable) -> Callable:
    """Registers a function as `python -m picogpt_lightning <name>`; its docstring is its help."""
    COMMANDS[function.__name__] = function
    return function


# ---- the project's own commands ---------------------------------------------------------


@command
def pipeline(
    size: str = "cpu",
    out_dir: str = "runs/pipeline",
    teacher_steps: Optional[int] = None,
    student_steps: Optional[int] = None,
    prompt: str = "ROMEO:",
    sample_tokens: int = 200,
    progress_bar: bool = True,
) -> None:
    """Train a teacher, distil a student, train the same student alone; print their val losses and a sample.

    Args:
        size: "cpu" shrinks configs/teacher, distill and student.yaml to run in minutes on a CPU; "full" runs them as written.
        out_dir: where checkpoints (out_dir/<stage>/last.ckpt) and TensorBoard runs go.
        teacher_steps: training steps of the teacher (default: 2000 at cpu size, the recipe's at full size).
        student_steps: training steps of each student, the same for both (default: 1000 at cpu size).
        prompt: the start of the distilled student's sample.
        sample_tokens: how many tokens to sample.
        progress_bar: show Lightning's progress bars.
    """
    from picogpt_lightning.pipeline import run_pipeline

    run_pipeline(size, out_dir, teacher_steps, student_steps, prompt, sample_tokens, progress_bar)


@command
def generate(
    ckpt: str,
    prompt: Optional[str] = None,
    prompts_file: Optional[str] = None,
    max_new_tokens: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, Literal["never"]] = False,
    stop_at_eos: bool = True,
    seed: int = 1337,
    stream: bool = True,
    device: str = "cpu",
) -> None:
    """Continue prompts with a trained checkpoint and print the text (streamed when sampling).

    Args:
        ckpt: a checkpoint written by training (it holds the model config and the tokenizer).
        prompt: the text to continue; the two characters \\n stand for a newline.
        prompts_file: a file of prompts, one per line (blank lines skipped), decoded as one batch.
        max_new_tokens: how many tokens to add at most (default: as many as the model's block_size leaves after the longest prompt).
        do_sample: sample instead of taking the most likely token (greedy) or the best beams.
        temperature: divides the logits before sampling (< 1 sharper, > 1 flatter).
        top_k: sample only among the k most likely tokens (None or 0: all).
        top_p: sample only among the most likely tokens holding probability top_p (nucleus).
        repetition_penalty: > 1 discourages tokens already in the text (transformers' rule).
        num_beams: beam search with this many beams when > 1.
        num_return_sequences: continuations per prompt (samples, or the best beams).
        length_penalty: beam score = log-probability / length ** length_penalty.
        early_stopping: beam search stops when num_beams hypotheses are done (true), when no beam can improve (false), or only at max_new_tokens ("never").
        stop_at_eos: stop a sequence at the tokenizer's end-of-text token (if it has one).
        seed: random seed, so samples can be reproduced.
        stream: print sampled tokens as they come (one prompt at a time, one sequence each).
        device: "cpu", "cuda" or any torch device.
    """
    import torch
    from picogpt_lightning import checkpoints
    from picogpt_lightning.data.tokenizer import Tokenizer
    from picogpt_lightning.model import PicoGPT
    from picogpt_lightning.model.generation import resolve_generation_config
    from picogpt_lightning.text_generation import encode_prompts, generate_texts

    prompts = read_prompts(prompt, prompts_file)
    checkpoint = checkpoints.load(ckpt)  # read once: weights, config and tokenizer
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval().to(device), Tokenizer.from_checkpoint(checkpoint)
    if max_new_tokens is None:
        longest = max(len(tokenizer.encode(text)) for text in prompts)
        max_new_tokens = max(1, model.config.block_size - longest)  # a prompt too long still gets its one-line error
    generation_config = resolve_generation_config(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, num_beams=num_beams, num_return_sequences=num_return_sequences,
        length_penalty=length_penalty, early_stopping=early_stopping,
    )
    torch.manual_seed(seed)
    if stream and do_sample and num_beams == 1 and num_return_sequences == 1:
        from transformers import TextStreamer

        eos = tokenizer.eos_token_id if stop_at_eos else None
        for number, text in enumerate(prompts):
            if number:
                print("-" * 40)
            input_ids, _ = encode_prompts(tokenizer, [text], device)
            streamer = TextStreamer(tokenizer.hf, skip_special_tokens=True)
            model.generate(
                input_ids, generation_config=generation_config, streamer=streamer, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        return
    texts = generate_texts(model, tokenizer, prompts, generation_config, stop_at_eos=stop_at_eos)
    for number, text in enumerate(texts):
        if number:
            print("-" * 40)
        print(text)


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> List[str]:
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts_file PATH")
    if prompts_file is not None:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts file not found: {prompts_file}")
        with open(prompts_file, encoding="utf-8") as lines:
            prompts = [line.rstrip("\n") for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{prompts_file} holds no prompts; write one prompt per line")
    else:
        prompts = [prompt]
    return [text.replace("\\n", "\n") for text in prompts]


@command
def export(ckpt: str, out: str, overwrite: bool = False) -> None:
    """Write a checkpoint as a Hugging Face directory (LlamaForCausalLM + tokenizer) for from_pretrained.

    Args:
        ckpt: a checkpoint written by training (model config and tokenizer inside); the model must use mlp="swiglu".
        out: the directory to create; AutoModelForCausalLM and AutoTokenizer.from_pretrained(out) load it offline.
        overwrite: replace out if it already exists.
    """
    from picogpt_lightning.hf import export_checkpoint

    export_checkpoint(ckpt, out, overwrite=overwrite)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({out!r}) and AutoTokenizer.from_pretrained({out!r}) load it")


@command
def quantize(
    ckpt: str,
    method: Literal["nf4", "bitnet"],
    out: str,
    block_size: int = 64,
    double_quant: bool = True,
    overwrite: bool = False,
) -> None:
    """Write a checkpoint with packed quantized weights (NF4 or BitNet), which generate and PicoGPT.from_checkpoint load.

    Args:
        ckpt: a full-precision checkpoint written by training (model config and tokenizer inside).
        method: "nf4": 4-bit NormalFloat weights for any model trained with linear="linear"; "bitnet": a model trained with linear="bitnet1.58" (2 bits per weight) or "bitnet1" (1 bit), plus one scale per tensor.
        out: the file to write.
        block_size: NF4 only: weights per absmax constant.
        double_quant: NF4 only: store the absmax constants in 8 bits as well (QLoRA's double quantization).
        overwrite: replace out if it already exists.
    """
    from picogpt_lightning.quant.packed_file import quantize_checkpoint

    quantization = quantize_checkpoint(ckpt, out, method, block_size=block_size, double_quant=double_quant, overwrite=overwrite)
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 1e6:.2f} MB, {quantization['method']}): python -m picogpt_lightning generate --ckpt {out} ...")


@command
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
        t: how far from a towards b: a number; a list spread over the blocks (first value at block 0, last at the last block; embeddings take the first, the final norm the last); or a dict of those per kind, {"attention": ..., "mlp": ..., "default": ...}. Per-kind schedules read best from a YAML file given with --config.
        method: "slerp" (spherical) or "linear" (plain (1 - t) a + t b, for comparison).
        overwrite: replace out if it already exists.
    """
    from picogpt_lightning.merge import lerp, merge_checkpoints, slerp

    merge_checkpoints(a, b, out, t, overwrite=overwrite, interpolate=slerp if method == "slerp" else lerp)
    print(f"wrote {out}: {method} of {a} (t = 0) and {b} (t = 1) at t = {t}")


def run_command(name: str, args: List[str]) -> None:
    from jsonargparse import CLI

    CLI(COMMANDS[name], args=args, prog=f"python -m picogpt_lightning {name}", as_positional=False)


def print_help() -> None:
    print("usage: python -m picogpt_lightning <command> [options]\n")
    print("commands:")
    for name, summary in LIGHTNING_SUBCOMMANDS.items():
        print(f"  {name:<10} {summary}")
    for name, function in COMMANDS.items():
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        print(f"  {name:<10} {summary}")
    print("\n'python -m picogpt_lightning <command> --help' lists a command's options.")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return
    name, rest = argv[0], argv[1:]
    try:
        if name in COMMANDS:
            run_command(name, rest)
        elif name in LIGHTNING_SUBCOMMANDS:
            from picogpt_lightning.training import run_lightning

            run_lightning([name] + rest)
        else:
            print_help()
            sys.exit(f"error: unknown command {name!r}")
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get("PICOGPT_DEBUG"):
            raise
        sys.exit(f"error: {user_error}")


def find_user_error(error: BaseException) -> Optional[BaseException]:
    """The error this project's own input checks raised, if that is what went wrong.

    Such errors are one line that names the problem and its fix; jsonargparse and
    Lightning may wrap them, so the chain of causes is searched.
    """
    from picogpt_lightning.data.source import DataSourceError

    while error is not None:
        if isinstance(error, DataSourceError):
            return error
        if isinstance(error, (ValueError, FileNotFoundError)) and raised_in_this_project(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def raised_in_this_project(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("picogpt_lightning")
