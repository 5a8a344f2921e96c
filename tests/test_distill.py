"""DistillationModule: a frozen teacher, the combined loss, checkpoints, and teachers from transformers via the CLI."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.cli import main as cli_main
from picogpt_lightning.tokenizer import Tokenizer
from picogpt_lightning.modules import DistillationModule
from picogpt_lightning.modules.base import flops_per_token

VOCAB = 20
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(corpus_path) -> Path:
    return corpus_path


def student_config(**overrides) -> PicoGPTConfig:
    values = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_embd=16, n_head=2, n_query_groups=1)
    values.update(overrides)
    return PicoGPTConfig(**values)


def saved_teacher(directory: Path, **overrides) -> str:
    values = dict(vocab_size=VOCAB, block_size=16, n_layer=4, n_embd=32, n_head=4, dropout=0.5)
    values.update(overrides)
    torch.manual_seed(1)
    path = str(directory / "teacher.pt")
    PicoGPT(PicoGPTConfig(**values)).save(path)
    return path


def random_batch(batch: int = 3, length: int = 10) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, length + 1), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 6:] = 0  # one padded sequence
    labels = ids[:, 1:].masked_fill(mask == 0, -100)
    return {"input_ids": ids[:, :-1], "attention_mask": mask, "labels": labels}


# ---- the teacher is frozen --------------------------------------------------------------


def test_teacher_gets_no_gradient_keeps_dropout_off_and_stays_out_of_the_optimizer(tmp_path):
    module = DistillationModule(student_config(), teacher=saved_teacher(tmp_path), alpha_cos=1.0, lr_decay_steps=10)
    module.train()  # what Lightning does each epoch
    assert module.model.training and not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())

    batch = random_batch()
    first, _ = module.teacher_forward(batch, output_hidden_states=False)
    second, _ = module.teacher_forward(batch, output_hidden_states=False)
    assert torch.equal(first, second)  # dropout 0.5 would make these differ if it were on

    losses, _ = module.compute_losses(batch)
    losses["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.model.parameters())
    assert module.hidden_projection.weight.grad is not None  # widths 16 -> 32: a learned projection

    optimized = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in module.teacher.parameters())
    assert optimized == {id(p) for p in module.model.parameters()} | {id(module.hidden_projection.weight)}


def test_total_loss_weights_reference_losses(tmp_path):
    module = DistillationModule(
        student_config(), teacher=saved_teacher(tmp_path), temperature=2.0, alpha_ce=0.3, alpha_kd=0.6, alpha_cos=0.1
    )
    batch = random_batch()
    losses, logits = module.compute_losses(batch)
    real = batch["labels"] != -100
    ce = F.cross_entropy(logits[real], batch["labels"][real])
    with torch.no_grad():
        teacher_logits = module.teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = 4.0 * F.kl_div(
        F.log_softmax(logits[real] / 2, -1), F.softmax(teacher_logits[real] / 2, -1), reduction="batchmean"
    )
    assert torch.allclose(losses["ce"], ce, atol=1e-5)
    assert torch.allclose(losses["kd"], kd, atol=1e-5)
    assert torch.allclose(losses["loss"], 0.3 * ce + 0.6 * kd + 0.1 * losses["cos"], atol=1e-5)


def test_checkpoint_leaves_the_teacher_out_unless_asked(tmp_path):
    teacher = saved_teacher(tmp_path)
    for save_teacher in (False, True):
        module = DistillationModule(student_config(), teacher=teacher, save_teacher=save_teacher)
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        has_teacher = any(key.startswith("teacher.") for key in checkpoint["state_dict"])
        assert has_teacher == save_teacher
        assert "picogpt_config" in checkpoint  # the base's contents are still written
        # resuming without the teacher's weights works: they come from the teacher's path
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)


def test_loading_is_strict_for_the_student(tmp_path):
    module = DistillationModule(student_config(), teacher=saved_teacher(tmp_path))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    missing = dict(checkpoint["state_dict"])
    del missing["model.blocks.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"missing keys \['model.blocks.1.mlp.up_proj.weight'\]"):
        module.load_state_dict(missing)
    renamed = {key.replace("model.norm.", "model.final_norm."): value for key, value in checkpoint["state_dict"].items()}
    with pytest.raises(RuntimeError, match="unexpected keys.*model.final_norm.weight"):
        module.load_state_dict(renamed)


def test_teacher_is_skipped_when_its_losses_are_off(tmp_path):
    module = DistillationModule(student_config(), teacher=saved_teacher(tmp_path), alpha_ce=1.0, alpha_kd=0.0)
    calls = []
    module.teacher.register_forward_hook(lambda *args: calls.append(1))
    batch = random_batch()
    losses, logits = module.compute_losses(batch)
    assert calls == [] and set(losses) == {"loss", "ce"}
    real = batch["labels"] != -100
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits[real], batch["labels"][real]))
    assert module.module_flops_per_token(10, training=True) == flops_per_token(student_config(), 10, training=True)


def test_bad_settings_fail_with_clear_errors(tmp_path):
    teacher = saved_teacher(tmp_path)
    with pytest.raises(ValueError, match="not a multiple of the student's 3"):
        DistillationModule(student_config(n_layer=3), teacher=teacher, alpha_cos=1.0)
    with pytest.raises(ValueError, match="out of range"):
        DistillationModule(student_config(), teacher=teacher, alpha_cos=1.0, layer_map={3: 4})
    with pytest.raises(ValueError, match="all 0"):
        DistillationModule(student_config(), teacher=teacher, alpha_ce=0.0, alpha_kd=0.0)
    with pytest.raises(ValueError, match="cannot load teacher"):
        DistillationModule(student_config(), teacher=str(tmp_path / "no_such_model_dir"))


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
    reason="bitsandbytes and a GPU are present: 4-bit loading would work",
)
def test_4bit_teacher_without_bitsandbytes_or_gpu_is_a_clear_error(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs bitsandbytes and a CUDA GPU"):
        DistillationModule(student_config(), teacher=str(tmp_path), teacher_quantization="4bit")


# ---- transformers teachers through the CLI ----------------------------------------------


def tiny_llama_config(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def tiny_gpt2_config(vocab_size):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=24, n_layer=4, n_head=4)


def save_hf_teacher(directory: Path, corpus: Path, model_class: str, tokenizer_kind: str, extra_vocab: int = 0) -> str:
    """A randomly initialised transformers model and its tokenizer, saved as from_pretrained expects."""
    import transformers

    from picogpt_lightning.data import build_tokenizer

    text = corpus.read_text()
    tokenizer = build_tokenizer("char", text=text) if tokenizer_kind == "char" else build_tokenizer(
        "bpe", text=text[:200_000], vocab_size=300
    )
    config = (tiny_llama_config if model_class == "LlamaForCausalLM" else tiny_gpt2_config)(
        tokenizer.vocab_size + extra_vocab
    )
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(directory)
    tokenizer.save(directory)
    return str(directory)


def fit_distillation(tmp_path: Path, corpus: Path, teacher: str, **model_args) -> Path:
    config = {
        "model": {
            "class_path": "picogpt_lightning.modules.DistillationModule",
            "init_args": {
                "config": {"block_size": 32, "n_layer": 2, "n_embd": 16, "n_head": 2, "n_query_groups": 1},
                "teacher": teacher,
                "warmup_steps": 1,
                **model_args,
            },
        },
        "data": {
            "class_path": "picogpt_lightning.data.TinyShakespeareDataModule",
            "init_args": {
                "data_path": str(corpus), "tokenizer": teacher, "block_size": 32, "batch_size": 4,
                "train_samples": 12, "val_samples": 8,
            },
        },
        "trainer": {
            "accelerator": "cpu", "max_steps": 3, "limit_val_batches": 2, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
        },
        "checkpoint": {"dirpath": str(tmp_path / "checkpoints")},
    }
    config_path = tmp_path / "distill.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(config_path)])
    return tmp_path / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "model_class, tokenizer_kind, model_args",
    [
        ("LlamaForCausalLM", "char", {}),
        # GPT-2's 4 blocks of width 24 against the student's 2 of width 16: default map and a projection
        ("GPT2LMHeadModel", "bpe", {"alpha_cos": 0.5, "kd_top_k": 8}),
    ],
)
def test_transformers_teacher_distils_through_the_cli(tmp_path, corpus, model_class, tokenizer_kind, model_args):
    teacher = save_hf_teacher(tmp_path / "teacher", corpus, model_class, tokenizer_kind)
    checkpoint_path = fit_distillation(tmp_path, corpus, teacher, **model_args)

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    student = PicoGPT.from_checkpoint(str(checkpoint_path))
    from transformers import AutoConfig

    assert student.config.vocab_size == AutoConfig.from_pretrained(teacher).vocab_size


def test_teacher_with_a_vocabulary_padded_past_its_tokenizer_distils_through_the_cli(tmp_path, corpus):
    """Like Pythia (50,304 rows for 50,277 tokens): the student takes the teacher's 70 rows, the tokenizer has 65."""
    teacher = save_hf_teacher(tmp_path / "teacher", corpus, "LlamaForCausalLM", "char", extra_vocab=5)
    checkpoint_path = fit_distillation(tmp_path, corpus, teacher, alpha_ce=0.5)

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    student = PicoGPT.from_checkpoint(str(checkpoint_path))
    assert student.config.vocab_size == 70 and student.lm_head.out_features == 70
    assert Tokenizer.from_checkpoint(str(checkpoint_path)).vocab_size == 65


def test_tokenizer_larger_than_the_teachers_vocabulary_fails_before_training(tmp_path, corpus):
    teacher = save_hf_teacher(tmp_path / "teacher", corpus, "LlamaForCausalLM", "char", extra_vocab=-5)
    with pytest.raises(SystemExit) as error:
        fit_distillation(tmp_path, corpus, teacher)
    message = str(error.value)
    assert "the tokenizer has 65 tokens but the teacher's vocabulary has 60" in message
    assert "\n" not in message and "teacher's tokenizer" in message
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing written


# ---- a teacher of this project: the pipeline ---------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, corpus_path):
    """`make demo`'s command at 3 + 2 + 2 steps, once for the tests below: (its output, its directory)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("pipeline")
    result = subprocess.run(
        [sys.executable, "-m", "picogpt_lightning", "pipeline", "--teacher_steps", "3",
         "--student_steps", "2", "--sample_tokens", "10", "--out_dir", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PICOGPT_DATA": str(corpus_path), "OMP_NUM_THREADS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output, out


def test_pipeline_trains_teacher_then_both_students_on_the_teachers_tokenizer(pipeline_run):
    output, out = pipeline_run
    stages = {stage: torch.load(out / stage / "last.ckpt", map_location="cpu", weights_only=False)
              for stage in ("teacher", "distill", "student")}
    assert {stage: c["global_step"] for stage, c in stages.items()} == {"teacher": 3, "distill": 2, "student": 2}
    sizes = {stage: PicoGPT.from_checkpoint(str(out / stage / "last.ckpt")).num_parameters() for stage in stages}
    assert sizes["distill"] == sizes["student"] < sizes["teacher"] / 3  # the CPU student is ~1/4
    sample = output.split("sample from the distilled student:\n\n")[1].split("\n\n")[0]
    assert sample.startswith("ROMEO:") and len(sample) == len("ROMEO:") + 10  # char level: one token per char
    assert "| student + KD |" in output

    # the students' data used the teacher checkpoint's tokenizer; the teacher stays out of the student's file
    checkpoint = stages["distill"]
    assert checkpoint["datamodule_hyper_parameters"]["tokenizer"] == str(out / "teacher" / "best.ckpt")
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])

    # every stage validated at its last step at the latest: val/loss in its own TensorBoard run
    for stage, steps in (("teacher", 3), ("distill", 2), ("student", 2)):
        events = EventAccumulator(str(out / "runs" / stage / "version_0"))
        events.Reload()
        assert [event.step for event in events.Scalars("val/loss")] == [steps - 1], stage
        # every stage's val/loss is the model's cross-entropy (an untrained char model: about ln(65) = 4.17)
        assert 3.0 < events.Scalars("val/loss")[0].value < 4.6, stage
    kd_run = EventAccumulator(str(out / "runs" / "distill" / "version_0"))
    kd_run.Reload()  # the distillation objective keeps its own name
    assert "val/objective" in kd_run.Tags()["scalars"] and "val/kd" in kd_run.Tags()["scalars"]
    teacher_best = torch.load(out / "teacher" / "best.ckpt", map_location="cpu", weights_only=False)
    assert teacher_best["global_step"] == 3


def test_throughput_counts_the_teachers_forward(tmp_path):
    from picogpt_lightning.modules.base import flops_per_token

    module = DistillationModule(student_config(), teacher=saved_teacher(tmp_path))
    expected = flops_per_token(student_config(), 10, training=True) + flops_per_token(module.teacher.config, 10, False)
    assert module.module_flops_per_token(10, training=True) == expected


def test_pipeline_output_reads_as_a_report(pipeline_run):
    """What `make demo` prints: one line per stage, progress bars without negative totals, no warnings."""
    import re

    output, _ = pipeline_run
    assert not re.search(r"\w*Warning\b|warn", output), output
    assert not any(line in output for line in ("litlogger", "Total FLOPs", "Map:", "configure_callbacks")), output
    assert not re.search(r"Epoch \d+/-\d", output)
    stage_lines = [line for line in output.splitlines() if line.startswith("==> ")]
    assert len(stage_lines) == 3 and all("last.ckpt" in line and "logs in" in line for line in stage_lines)
    assert "| student + KD |" in output
