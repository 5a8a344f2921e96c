"""Mixed and low precision on CPU: bf16 tracks fp32, each mode computes in its dtype, losses stay fp32."""

import warnings

import pytest
import torch

from picogpt_lightning.modules import LanguageModelModule
from tiny_training import LossRecorder, quiet_trainer, seed_everything, tiny_config, tiny_datamodule


class DtypeRecordingLM(LanguageModelModule):
    """Notes the dtypes the forward pass and the loss actually ran in."""

    def compute_losses(self, batch):
        losses, logits = super().compute_losses(batch)
        self.seen = {
            "weights": self.model.lm_head.weight.dtype,
            "logits": logits.dtype,
            "loss": losses["loss"].dtype,
        }
        return losses, logits


def fit(corpus_path, precision: str, steps: int = 5, module=LanguageModelModule):
    seed_everything()
    model = module(tiny_config(), warmup_steps=1, lr_decay_steps=steps)
    recorder = LossRecorder()
    # gradient clipping on, as every recipe has it: Lightning's mixed precision refuses it with a fused AdamW
    trainer = quiet_trainer(precision=precision, max_steps=steps, gradient_clip_val=1.0, callbacks=[recorder])
    trainer.fit(model, datamodule=tiny_datamodule(corpus_path, batch_size=8))
    return model, recorder.losses, trainer


def test_bf16_mixed_training_tracks_fp32(corpus_path):
    _, fp32_losses, _ = fit(corpus_path, "32-true")
    _, bf16_losses, trainer = fit(corpus_path, "bf16-mixed")

    assert trainer.precision == "bf16-mixed"
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); the fp32 master weights keep updates exact
    assert bf16_losses == pytest.approx(fp32_losses, abs=5e-3)
    assert bf16_losses != fp32_losses  # bf16 really computed something
    assert bf16_losses[-1] < bf16_losses[0] - 0.05


@pytest.mark.parametrize(
    "precision, weights, logits",
    [
        ("32-true", torch.float32, torch.float32),
        ("bf16-mixed", torch.float32, torch.bfloat16),  # autocast: fp32 weights, bf16 matmuls
        ("bf16-true", torch.bfloat16, torch.bfloat16),  # the whole module is cast
    ],
)
def test_each_precision_computes_in_its_dtype_and_keeps_the_loss_in_fp32(corpus_path, precision, weights, logits):
    model, losses, _ = fit(corpus_path, precision, steps=3, module=DtypeRecordingLM)

    assert model.seen == {"weights": weights, "logits": logits, "loss": torch.float32}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_16_mixed_on_cpu_falls_back_to_bf16_mixed_with_a_warning():
    # Lightning's own fallback, kept as is: CPU autocast has no float16 gradient scaling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(precision="16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert any("bf16-mixed" in str(warning.message) for warning in caught)


def test_bf16_mixed_clips_before_a_fused_adamw_step(corpus_path):
    """Lightning's mixed-precision plugin refuses clipping with a fused optimizer; the module clips itself."""
    seed_everything()
    model = LanguageModelModule(tiny_config(), warmup_steps=0, lr_decay_steps=1)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    clip = 0.05  # below the first step's norm, so clipping acts
    datamodule = tiny_datamodule(corpus_path, batch_size=8)
    trainer = quiet_trainer(precision="bf16-mixed", max_steps=1, gradient_clip_val=clip)
    trainer.fit(model, datamodule=datamodule)
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"]

    # the same step written out: bf16 autocast forward, clip the global norm, fused AdamW
    reference = LanguageModelModule(tiny_config(), warmup_steps=0, lr_decay_steps=1)
    reference.load_state_dict(initial)
    seed_everything()  # the trainer's loader draws its order from the same seeded generator
    batch = next(iter(datamodule.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reference.compute_losses(batch)[0]["loss"]
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    assert norm > clip
    reference_optimizer = reference.configure_optimizers()["optimizer"]  # same groups, lr, fused kernel
    reference_optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
