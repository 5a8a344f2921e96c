"""picogpt_lightning.checkpoints: the three formats, refusals with one-line errors, one read per command."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.cli import main
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer
from factories import tiny_config
from test_cli_generate import TEXT, train_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "picogpt_lightning"

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def logits_of(model: PicoGPT) -> torch.Tensor:
    ids = torch.arange(12).view(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    train_tiny_checkpoint(path, build_tokenizer("char", TEXT))
    return str(path)


# ---- the three formats ------------------------------------------------------------------


def test_reads_a_lightning_checkpoint(lightning_ckpt):
    from picogpt_lightning.modules import LanguageModelModule

    checkpoint = checkpoints.load(lightning_ckpt)
    reference = LanguageModelModule.load_from_checkpoint(lightning_ckpt).model  # Lightning's own loading
    assert checkpoint.config == reference.config
    torch.testing.assert_close(logits_of(PicoGPT.from_checkpoint(checkpoint)), logits_of(reference), atol=0, rtol=0)
    assert Tokenizer.from_checkpoint(checkpoint).decode(Tokenizer.from_checkpoint(checkpoint).encode(TEXT)) == TEXT
    assert checkpoint.global_step == 10
    assert not any(key.startswith("model.") for key in checkpoint.state_dict)


def test_reads_a_saved_model_with_its_tokenizer(tmp_path):
    model, tokenizer = PicoGPT(tiny_config()), build_tokenizer("char", TEXT)
    checkpoints.save(tmp_path / "model.pt", model, tokenizer)
    checkpoint = checkpoints.load(tmp_path / "model.pt")
    torch.testing.assert_close(logits_of(PicoGPT.from_checkpoint(checkpoint)), logits_of(model), atol=0, rtol=0)
    assert Tokenizer.from_checkpoint(checkpoint).encode(TEXT) == tokenizer.encode(TEXT)
    assert not list(tmp_path.glob("*.tmp"))


def test_reads_a_bare_state_dict_given_its_config(tmp_path):
    model = PicoGPT(tiny_config())
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    checkpoint = checkpoints.load(tmp_path / "bare.pt")
    assert checkpoint.config is None
    torch.testing.assert_close(logits_of(PicoGPT.from_checkpoint(checkpoint, config=tiny_config())), logits_of(model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no model config"):
        PicoGPT.from_checkpoint(checkpoint)


def test_compiled_model_prefixes_are_removed(tmp_path):
    model = PicoGPT(tiny_config())
    prefixed = {f"model._orig_mod.{key}": value for key, value in model.state_dict().items()}
    prefixed["teacher.lm_head.weight"] = torch.zeros(3, 3)  # a frozen model beside it is left out
    torch.save({"state_dict": prefixed, "picogpt_config": model.config.to_dict()}, tmp_path / "c.ckpt")
    torch.testing.assert_close(logits_of(PicoGPT.from_checkpoint(str(tmp_path / "c.ckpt"))), logits_of(model))


# ---- refusals -----------------------------------------------------------------------------


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        function(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_truncated_random_and_planted_files_are_refused(lightning_ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    data = Path(lightning_ckpt).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated.ckpt" in one_line_error(checkpoints.load, truncated)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(4096))
    assert "noise.ckpt" in one_line_error(checkpoints.load, noise)

    planted = tmp_path / "planted.ckpt"
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "payload": Planted(str(marker))}, planted)
    message = one_line_error(checkpoints.load, planted)
    assert "planted.ckpt" in message and "trust" in message
    assert not marker.exists()  # nothing ran


class Planted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_foreign_architectures_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    torch.save(llama.state_dict(), tmp_path / "llama.bin")
    message = one_line_error(PicoGPT.from_checkpoint, str(tmp_path / "llama.bin"), config=tiny_config())
    assert "llama.bin" in message and "Missing key" in message

    PicoGPT(tiny_config()).save(str(tmp_path / "pico.pt"))
    message = one_line_error(PicoGPT.from_checkpoint, str(tmp_path / "pico.pt"), config=tiny_config(n_head=8, rope_theta=500.0))
    assert "pico.pt" in message and "n_head 4" in message and "rope_theta 10000.0" in message
    # training-only fields may differ
    assert PicoGPT.from_checkpoint(str(tmp_path / "pico.pt"), config=tiny_config(dropout=0.1)) is not None


@pytest.mark.parametrize("kind", ["truncated", "noise", "llama"])
def test_cli_refusals_are_one_line_without_traceback(kind, lightning_ckpt, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        data = Path(lightning_ckpt).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "noise":
        path.write_bytes(os.urandom(2048))
    else:
        torch.save({"state_dict": {"model.layers.0.weight": torch.zeros(2)}, "picogpt_config": tiny_config().to_dict()}, path)
    result = subprocess.run(
        [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", str(path), "--prompt", "to"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PICOGPT_DEBUG": ""},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ---- one read, one settings object ----------------------------------------------------------


def test_cli_generate_reads_its_checkpoint_once(lightning_ckpt, monkeypatch, capsys):
    reads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        reads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    main(["generate", "--ckpt", lightning_ckpt, "--prompt", "to be", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("to be")
    assert reads == [lightning_ckpt]


def test_generation_config_equals_the_same_keywords():
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = PicoGPT(tiny_config()).eval()
    prompt = torch.randint(0, 40, (2, 5))
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(7)
    from_keywords = model.generate(prompt, **settings)
    torch.manual_seed(7)
    from_config = model.generate(prompt, generation_config=GenerationConfig(**settings))
    assert torch.equal(from_keywords, from_config)
    # keywords update a copy: the config itself is unchanged
    config = GenerationConfig(num_beams=3, max_new_tokens=6)
    before = config.to_json_string()
    beams = model.generate(prompt, generation_config=config, num_return_sequences=2)
    assert beams.shape[0] == 4 and config.to_json_string() == before
    assert torch.equal(beams, model.generate(prompt, num_beams=3, max_new_tokens=6, num_return_sequences=2))


def test_unknown_generation_option_is_a_one_line_error():
    model = PicoGPT(tiny_config())
    assert "top_kk" in one_line_error(model.generate, torch.zeros(1, 3, dtype=torch.long), top_kk=3)


def test_no_import_cycle_between_package_modules():
    """No chain of imports (module-level or inside functions) leads from a module back to itself."""
    paths = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("picogpt_lightning"):
                # `from package import submodule` depends on the submodule, not on the package's __init__
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in paths else node.module)
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in paths}
        graph[name] = {edge for edge in edges if edge in paths and edge != name}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [cycle for cycle in map(cycle_from, graph) if cycle]
    assert not cycles, cycles[0]
