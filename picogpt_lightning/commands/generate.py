"""`python -m picogpt_lightning generate`: continue prompts with a checkpoint and print the text.

It imports only what decoding needs (no Lightning), and past the model's block_size the
window slides, so any length can be asked for; nanoGPT's sample.py is
`--max_new_tokens 500 --num_samples 10 --temperature 0.8 --top_k 200`.
"""

import os
import sys
from typing import List, Literal, Optional, Union

import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.generation.settings import SEED_RANGE
from picogpt_lightning.generation import TextStream, encode_prompts, generate_texts, resolve_generation_config
from picogpt_lightning.textfiles import read_text
from picogpt_lightning.tokenizer import Tokenizer

ACCELERATORS = ("cuda", "mps", "xpu")  # device types whose torch module tells if one is present, and how many
SEPARATOR = "-" * 40


def generate(
    ckpt: str,
    prompt: Optional[str] = None,
    prompts_file: Optional[str] = None,
    max_new_tokens: int = 500,
    num_samples: int = 1,
    do_sample: Optional[bool] = None,
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
    """Continue prompts with a trained checkpoint and print the text, streamed as it is made.

    Args:
        ckpt: a checkpoint written by training (it holds the model config and the tokenizer), or a packed quantized file.
        prompt: the text to continue; the two characters \\n stand for a newline.
        prompts_file: a file of prompts, one per line (blank lines skipped).
        max_new_tokens: how many tokens to add at most; past the model's block_size each token sees the last block_size.
        num_samples: independent samples of each prompt (sampling is then the default).
        do_sample: sample instead of taking the most likely token (greedy) or the best beams; default: sample when num_samples > 1.
        temperature: divides the logits before sampling (< 1 sharper, > 1 flatter).
        top_k: sample only among the k most likely tokens (None or 0: all).
        top_p: sample only among the most likely tokens holding probability top_p (nucleus).
        repetition_penalty: > 1 discourages tokens already in the text (transformers' rule).
        num_beams: beam search with this many beams when > 1.
        num_return_sequences: the best beams to print per prompt (beam search).
        length_penalty: beam score = log-probability / length ** length_penalty.
        early_stopping: beam search stops when num_beams hypotheses are done (true), when no beam can improve (false), or only at max_new_tokens ("never").
        stop_at_eos: stop a sequence at the tokenizer's end-of-text token (if it has one).
        seed: random seed, so samples can be reproduced.
        stream: print tokens as they come, one sequence at a time (greedy and sampling); false: decode all prompts as one batch.
        device: "cpu", "cuda" or any torch device.
    """
    prompts = read_prompts(prompt, prompts_file)
    do_sample = sampling_choice(do_sample, num_samples, num_return_sequences, num_beams)
    device = check_device(device)
    checkpoint = checkpoints.load(ckpt)  # read once: weights, config and tokenizer
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval().to(device), Tokenizer.from_checkpoint(checkpoint)
    generation_config = resolve_generation_config(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences if num_beams > 1 else num_samples,
    )
    torch.manual_seed(check_seed(seed))
    if stream and num_beams == 1:
        stream_texts(model, tokenizer, prompts, generation_config, num_samples, stop_at_eos, device)
        return
    print_texts(generate_texts(model, tokenizer, prompts, generation_config, stop_at_eos=stop_at_eos))


def sampling_choice(do_sample: Optional[bool], num_samples: int, num_return_sequences: int, num_beams: int) -> bool:
    """Whether to sample: as asked, or when several samples are asked for; refuses what cannot be done."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"--num_samples must be a positive integer, got {num_samples!r}")
    if num_samples > 1 and (num_beams > 1 or num_return_sequences > 1):
        raise UserError("--num_samples draws samples; for several beams use --num_beams N --num_return_sequences K instead")
    if num_samples > 1 and do_sample is False:
        raise UserError("greedy decoding gives one continuation per prompt; drop --do_sample false or --num_samples")
    if do_sample is None:
        return num_samples > 1
    return do_sample


def stream_texts(model, tokenizer, prompts: List[str], generation_config, num_samples: int, stop_at_eos: bool, device) -> None:
    """Decodes each prompt `num_samples` times in turn, writing its text to stdout as it is made."""
    eos = tokenizer.eos_token_id if stop_at_eos else None
    config = resolve_generation_config(generation_config, num_return_sequences=1)
    for number in range(len(prompts) * num_samples):
        if number:
            print(SEPARATOR)
        input_ids, _ = encode_prompts(tokenizer, [prompts[number // num_samples]], device)
        streamer = TextStream(tokenizer, write_now, eos_token_id=eos)
        model.generate(
            input_ids, generation_config=config, streamer=streamer, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        print()


def write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def print_texts(texts: List[str]) -> None:
    for number, text in enumerate(texts):
        if number:
            print(SEPARATOR)
        print(text)


def check_device(device: str) -> torch.device:
    """The torch device `device` names, refused in one line when it is none or not present on this machine.

    Checked before the checkpoint is read: torch's own error comes from deep inside `.to(device)`.
    """
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    kind = parsed.type
    if kind == "cpu":
        return parsed
    if kind not in ACCELERATORS:  # meta, lazy, ...: devices without kernels to decode with
        raise UserError(f"--device {device}: generation cannot run on a {kind!r} device; use cpu, cuda or mps")
    backend = getattr(torch, kind)
    count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        name = "CUDA" if kind == "cuda" else kind
        raise UserError(f"--device {device} asks for {name}, but no {name} device is available here; use --device cpu")
    if parsed.index is not None and parsed.index >= count:
        raise UserError(
            f"--device {device}: this machine has {count} {kind} device(s), {kind}:0 to {kind}:{count - 1}; "
            f"pick one of those (or --device {kind} for the first)"
        )
    return parsed


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> List[str]:
    """The prompts to continue, `\\n` read as a newline; one-line errors for none, both, or an empty file."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts_file PATH")
    if prompts_file is not None:
        if not os.path.isfile(prompts_file):
            raise InputNotFound(f"prompts file not found: {prompts_file}")
        lines = read_text(prompts_file, "prompts file").split("\n")
        prompts = [line.rstrip("\r") for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"{prompts_file} holds no prompts; write one prompt per line")
    else:
        prompts = [prompt]
    return [text.replace("\\n", "\n") for text in prompts]



def check_seed(seed: int) -> int:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"--seed {seed} is out of range; pick an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    return seed
