"""Silent wrong values refused in one line: weights holding NaN or infinity, sampling values past float32."""

import math

import pytest
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.cli import main
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import build_tokenizer
from tiny_training import tiny_config


@pytest.fixture
def model_and_tokenizer():
    tokenizer = build_tokenizer("char", "to be or not to be")
    torch.manual_seed(0)
    return PicoGPT(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer


def one_line_error(args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path, model_and_tokenizer, value):
    model, tokenizer = model_and_tokenizer
    name = next(key for key, tensor in model.state_dict().items() if tensor.dim() == 2 and key.startswith("blocks.0."))
    with torch.no_grad():
        model.state_dict()[name][0, 1] = value
    path = tmp_path / "diverged.ckpt"
    checkpoints.save(path, model, tokenizer)
    message = one_line_error(["generate", "--ckpt", str(path), "--prompt", "to", "--max_new_tokens", "3"])
    assert f"tensor {name} holds 1 NaN or infinite value(s)" in message and "use an earlier checkpoint" in message
    with pytest.raises(checkpoints.CheckpointError, match=name):
        PicoGPT.from_checkpoint(path)


@pytest.mark.parametrize("options, named", [
    (dict(temperature=1e-300), "temperature 1e-300"),
    (dict(temperature=math.inf), "temperature inf"),
    (dict(top_p=1e-300), "top_p 1e-300"),
    (dict(repetition_penalty=1e-300), "repetition_penalty 1e-300"),
])
def test_sampling_values_past_float32_are_refused_in_one_line(model_and_tokenizer, options, named):
    model, _ = model_and_tokenizer
    with pytest.raises(UserError, match=named):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=True, **options)


def test_a_tiny_temperature_on_the_command_line_is_one_line(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    checkpoints.save(tmp_path / "model.ckpt", model, tokenizer)
    message = one_line_error(["generate", "--ckpt", str(tmp_path / "model.ckpt"), "--prompt", "to",
                              "--do_sample", "true", "--temperature", "1e-300"])
    assert "temperature 1e-300" in message and "do_sample=False" in message


def test_small_but_representable_values_still_sample(model_and_tokenizer):
    model, _ = model_and_tokenizer
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=True, temperature=1e-6, top_p=1e-6)
    greedy = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert torch.equal(out, greedy)  # both are the most likely token each step
