"""optimizer: muon: which parameters Muon trains, one step against written-out references, a fit that learns
and resumes exactly; a bad optimizer name and sharded training refused in one line."""

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from picogpt_lightning import checkpoints
from picogpt_lightning.callbacks import LastCheckpoint, RandomStateCheckpoint
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.errors import UserError
from picogpt_lightning.modules import DistillationModule, LanguageModelModule
from picogpt_lightning.modules.muon import Muon, MuonWithAdamW, check_whole_matrices
from picogpt_lightning.modules.optim import warmup_cosine
from test_faults_resume import refusal, write_config
from tiny_training import (
    BLOCK_SIZE, LossRecorder, quiet_trainer, seed_everything, step_losses, tiny_config, tiny_teacher,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*val_dataloader")

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's coefficients (Keller Jordan's quintic)
BLOCK_MATRICES = [
    "attn.qkv.weight", "attn.proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
]
NORMS = ["attn_norm.weight", "mlp_norm.weight"]


def muon_module(**config) -> LanguageModelModule:
    torch.manual_seed(0)
    return LanguageModelModule(
        tiny_config(**config), optimizer="muon", muon_lr=0.05, muon_weight_decay=0.1, learning_rate=3e-3,
        warmup_steps=0, lr_decay_steps=10,  # the schedule's factor is 1 at step 0: the step sees the lrs as given
    )


def groups_by_name(module) -> dict:
    names = {id(param): name for name, param in module.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    return {group["name"]: sorted(names[id(param)] for param in group["params"]) for group in optimizer.param_groups}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    groups = groups_by_name(muon_module(tie_weights=tied))
    blocks = [f"model.blocks.{i}.{name}" for i in range(2) for name in BLOCK_MATRICES]
    embeddings = ["model.tok_embeddings.weight"] + ([] if tied else ["model.lm_head.weight"])  # tied: one tensor
    norms = [f"model.blocks.{i}.{name}" for i in range(2) for name in NORMS] + ["model.norm.weight"]
    assert groups == {"muon": sorted(blocks), "weight_decay": sorted(embeddings), "no_weight_decay": sorted(norms)}


def test_distillation_gives_its_projection_to_adamw_and_its_teacher_to_neither(tmp_path):
    module = DistillationModule(
        tiny_config(), teacher=tiny_teacher(str(tmp_path / "teacher.pt")), alpha_ce=0.3, alpha_kd=0.6, alpha_cos=0.1,
        optimizer="muon", lr_decay_steps=10,
    )
    groups = groups_by_name(module)
    assert groups["muon"] == sorted(f"model.blocks.{i}.{name}" for i in range(2) for name in BLOCK_MATRICES)
    assert groups["weight_decay"] == ["hidden_projection.weight", "model.tok_embeddings.weight"]
    assert not any(name.startswith("teacher.") for names in groups.values() for name in names)


@pytest.mark.parametrize("strategy", [ModelParallelStrategy, FSDPStrategy], ids=["fsdp2", "fsdp1"])
def test_sharded_training_refuses_muon_in_one_line(strategy):
    trainer = SimpleNamespace(strategy=strategy())  # what check_whole_matrices reads of a Trainer
    with pytest.raises(UserError, match="^optimizer 'muon' needs whole weight matrices, but FSDP shards them; set"):
        check_whole_matrices(muon_module(), trainer)


def newton_schulz(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float32: X <- aX + (bA + cA^2)X with A = XX^T, on the wide side."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def test_one_step_moves_each_matrix_by_its_orthogonalised_nesterov_momentum():
    module = muon_module()
    optimizer = module.configure_optimizers()["optimizer"]
    qkv = module.model.blocks[0].attn.qkv.weight  # 64 x 32: q's 32 rows (4 heads of 8), then k's 16 and v's 16
    gate = module.model.blocks[0].mlp.gate_proj.weight  # tall: intermediate_size x 32
    embedding = module.model.tok_embeddings.weight
    before, grads = {}, {}
    for param in module.parameters():
        before[param] = param.detach().clone()
        param.grad = grads[param] = torch.randn_like(param)
    # the fused weight steps as q, k and v would apart: Muon on three separate matrices
    reference_blocks = [torch.nn.Parameter(block.clone()) for block in before[qkv].split([32, 16, 16])]
    for block, grad in zip(reference_blocks, grads[qkv].split([32, 16, 16])):
        block.grad = grad.clone()
    Muon(reference_blocks, lr=0.05, weight_decay=0.1).step()
    reference_adamw = torch.nn.Parameter(before[embedding].clone())
    reference_adamw.grad = grads[embedding].clone()
    # fused, as adamw() builds it on CPU
    torch.optim.AdamW([reference_adamw], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True).step()

    optimizer.step()

    # a pure dispatcher: exactly the step of each optimizer alone
    assert torch.equal(qkv.detach(), torch.cat([block.detach() for block in reference_blocks]))
    assert torch.equal(embedding.detach(), reference_adamw.detach())
    # the step written out: momentum (1 - 0.95) g, Nesterov's look-ahead g + 0.95 (buffer - g), orthogonalised,
    # times Muon's "original" scale sqrt(max(1, rows / cols)) per matrix: 1 for q, k, v, above 1 for the gate
    momentum = 0.95
    assert gate.shape[0] > 32
    for param, rows in [(qkv, [32, 16, 16]), (gate, [gate.shape[0]])]:
        look_ahead = grads[param] + momentum * ((1 - momentum) * grads[param] - grads[param])
        step = torch.cat([math.sqrt(max(1, block.shape[0] / 32)) * newton_schulz(block) for block in look_ahead.split(rows)])
        expected = before[param] * (1 - 0.05 * 0.1) - 0.05 * step
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-5)


def test_off_cuda_only_the_iterations_dtype_differs_from_torch_muon():
    torch.manual_seed(1)
    mine = torch.nn.Parameter(torch.randn(24, 40))
    torchs = torch.nn.Parameter(mine.detach().clone())
    ours = Muon([mine], ns_dtype=torch.bfloat16, lr=0.02, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon([torchs], lr=0.02, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):  # momentum carried over steps
        grad = torch.randn(24, 40)
        mine.grad, torchs.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(mine.detach(), torchs.detach())  # in bfloat16, torch's step bit for bit


# ---- a fit: it learns, every group follows the schedule, a resume is exact -------------------


def fit(corpus, root, max_steps, ckpt_path=None):
    """Per-step losses of a tiny Muon run with dropout (so the random state matters), last.ckpt in root."""
    seed_everything()
    module = LanguageModelModule(
        tiny_config(dropout=0.1), optimizer="muon", muon_lr=0.03, learning_rate=3e-3, warmup_steps=3,
        lr_decay_steps=20,
    )
    data = TinyShakespeareDataModule(
        data_path=str(corpus), block_size=BLOCK_SIZE, batch_size=4, train_samples=96, val_samples=8, seed=7,
    )
    recorder = LossRecorder()
    trainer = quiet_trainer(
        max_steps=max_steps, enable_checkpointing=True, default_root_dir=root, gradient_clip_val=1.0,
        callbacks=[recorder, RandomStateCheckpoint(), LastCheckpoint(dirpath=str(root))],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return step_losses(recorder.losses, 1), trainer


def test_a_muon_fit_learns_follows_the_schedule_and_resumes_exactly(corpus_path, tmp_path):
    straight, trainer = fit(corpus_path, tmp_path / "straight", 20)
    assert isinstance(trainer.optimizers[0], MuonWithAdamW)
    assert sum(straight[-5:]) / 5 < sum(straight[:5]) / 5 - 0.5  # it learns: from ~4.2 (uniform over 65) down
    factor = warmup_cosine(20, 3, 20, 1e-4 / 3e-3)  # the floor min_lr / learning_rate, for every group
    lrs = {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups}
    expected = {"muon": 0.03 * factor, "weight_decay": 3e-3 * factor, "no_weight_decay": 3e-3 * factor}
    assert lrs == pytest.approx(expected)

    first, _ = fit(corpus_path, tmp_path / "split", 10)
    rest, _ = fit(corpus_path, tmp_path / "rest", 20, ckpt_path=str(tmp_path / "split" / "last.ckpt"))
    assert first + rest == straight  # loss for loss, bit for bit
    resumed = checkpoints.load(tmp_path / "rest" / "last.ckpt")
    uninterrupted = checkpoints.load(tmp_path / "straight" / "last.ckpt")
    assert resumed.contents["optimizer_states"][0].keys() == {"muon", "adamw"}
    for name, tensor in uninterrupted.contents["state_dict"].items():
        assert torch.equal(resumed.contents["state_dict"][name], tensor), name


def test_an_unknown_optimizer_is_refused_in_one_line(tmp_path):
    config = write_config(tmp_path)
    message = refusal(config, "--model.init_args.optimizer=sgd")
    assert message == "error: optimizer must be one of ('adamw', 'muon'), got 'sgd'; set model optimizer: adamw or muon"
