"""LoRA and QLoRA: what trains, what is stored, and peft and transformers computing the same model."""

import os

import pytest
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.callbacks import LastCheckpoint, RandomStateCheckpoint
from picogpt_lightning.commands.export import export_checkpoint
from picogpt_lightning.errors import UserError
from picogpt_lightning.lora import LoraSettings
from picogpt_lightning.modules import DPOModule, LanguageModelModule
from picogpt_lightning.quant.nf4 import NF4Linear

from tiny_training import quiet_trainer, seed_everything, tiny_config, tiny_datamodule

BLOCKS = range(2)  # tiny_config has two blocks
TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def adapter_names():
    return {f"model.blocks.{i}.{layer}.lora_{m}.default.weight" for i in BLOCKS for layer in TARGETS for m in "AB"}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, corpus_path):
    """A briefly pretrained tiny model: a Lightning checkpoint with its tokenizer, as fine-tunes start from."""
    seed_everything()
    module = LanguageModelModule(tiny_config(), learning_rate=3e-3)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, datamodule=tiny_datamodule(corpus_path, batch_size=4))
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    trainer.save_checkpoint(path)
    return path, corpus_path


def lora_run(base_checkpoint, tmp_path, steps=3, base="full", ckpt_path=None, name="lora"):
    path, corpus = base_checkpoint
    seed_everything()
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, base=base)
    module = LanguageModelModule(init_from=str(path), lora=settings, learning_rate=2e-2, warmup_steps=0, lr_decay_steps=4)
    last = LastCheckpoint(dirpath=str(tmp_path / name))  # where a run stopped mid-way resumes from
    trainer = quiet_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[RandomStateCheckpoint(), last])
    # two steps an epoch: a run of three crosses an epoch's end
    trainer.fit(module, datamodule=tiny_datamodule(corpus, batch_size=4, train_samples=8), ckpt_path=ckpt_path)
    return module, tmp_path / name / "last.ckpt"


@pytest.fixture(scope="module")
def trained(base_checkpoint, tmp_path_factory):
    """One short LoRA run and one QLoRA run, shared by the tests that only read them: {base: (module, last.ckpt)}."""
    root = tmp_path_factory.mktemp("runs")
    return {base: lora_run(base_checkpoint, root, base=base, name=base) for base in ("full", "nf4")}


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 3, 22, 9, 41, 12, 30, 2, 7, 19, 60]])


def test_only_the_adapters_are_trainable_and_receive_gradients(base_checkpoint):
    path, _ = base_checkpoint
    module = LanguageModelModule(init_from=str(path), lora=LoraSettings(r=4, alpha=8))
    assert {name for name, p in module.named_parameters() if p.requires_grad} == adapter_names()
    batch = {"input_ids": IDS, "labels": IDS}
    module.compute_losses(batch)[0]["loss"].backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert with_grad == adapter_names()
    # B starts at zero, so A's first gradient is zero; B's is not
    assert all(p.grad.abs().sum() > 0 for name, p in module.named_parameters() if ".lora_B." in name)


def test_qlora_keeps_the_base_packed_in_nf4_while_it_trains(base_checkpoint, trained):
    path, _ = base_checkpoint
    before = LanguageModelModule(init_from=str(path), lora=LoraSettings(r=4, alpha=8, base="nf4"))
    module, _ = trained["nf4"]
    for i in BLOCKS:
        for layer in TARGETS:
            trained = module.model.get_submodule(f"blocks.{i}.{layer}")
            untouched = before.model.get_submodule(f"blocks.{i}.{layer}")
            assert isinstance(trained.base_layer, NF4Linear) and trained.base_layer.packed.dtype == torch.uint8
            assert torch.equal(trained.base_layer.packed, untouched.base_layer.packed)
            assert not torch.equal(trained.lora_B.default.weight, untouched.lora_B.default.weight)
    # no full-precision copy of a block weight is held anywhere: the blocks keep only norms and adapters as floats
    floats = [name for name, p in module.model.named_parameters() if ".blocks." in f".{name}" and p.dim() == 2]
    assert all(".lora_" in name for name in floats)


def test_a_lora_checkpoint_holds_the_adapters_and_their_optimizer_state_only(base_checkpoint, trained):
    _, saved = trained["full"]
    contents = torch.load(saved, weights_only=True)
    assert {key for key in contents["state_dict"] if key.startswith("model.")} == adapter_names()
    state = contents["optimizer_states"][0]["state"]
    assert len(state) == len(adapter_names()) and all(v["exp_avg"].dim() == 2 for v in state.values())
    assert contents[checkpoints.LORA_KEY]["base"] == os.path.abspath(base_checkpoint[0])


def test_the_folded_weights_are_the_base_plus_scaled_b_times_a(base_checkpoint, trained):
    module, saved = trained["full"]
    base = PicoGPT.from_checkpoint(base_checkpoint[0]).state_dict()
    folded = PicoGPT.from_checkpoint(saved).eval()
    layer = module.model.blocks[1].attn.qkv
    expected = base["blocks.1.attn.qkv.weight"] + (8 / 4) * layer.lora_B.default.weight @ layer.lora_A.default.weight
    torch.testing.assert_close(folded.state_dict()["blocks.1.attn.qkv.weight"], expected.detach())
    torch.testing.assert_close(logits_of(folded, IDS), logits_of(module.model.eval(), IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("base", ["full", "nf4"])
def test_peft_loads_the_exported_adapter_onto_the_exported_base_and_computes_the_runs_logits(trained, tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, saved = trained[base]
    assert export_checkpoint(str(saved), str(tmp_path / "hf")) is True
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), str(tmp_path / "hf" / "adapter"))
    ours = logits_of(module.model.eval(), IDS)
    torch.testing.assert_close(logits_of(peft_model.eval(), IDS), ours, atol=1e-5, rtol=0)
    # the adapter changes the model: without it, peft's base is another function
    with peft_model.disable_adapter():
        assert (logits_of(peft_model, IDS) - ours).abs().max() > 1e-3
    export_checkpoint(str(saved), str(tmp_path / "merged"), merge_adapters=True)
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(merged, IDS), ours, atol=1e-5, rtol=0)


def test_a_lora_run_resumes_exactly(base_checkpoint, tmp_path):
    straight, _ = lora_run(base_checkpoint, tmp_path, steps=3, name="straight")
    _, halfway = lora_run(base_checkpoint, tmp_path, steps=1, name="half")
    resumed, _ = lora_run(base_checkpoint, tmp_path, steps=3, ckpt_path=str(halfway), name="resumed")
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_changed_or_missing_base_is_refused_in_one_line(base_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "base_copy.ckpt"
    shutil.copy(base_checkpoint[0], copy)
    module = LanguageModelModule(init_from=str(copy), lora=LoraSettings(r=2))
    saved = tmp_path / "adapters.pt"
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}, "picogpt_config": module.config.to_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, saved)
    PicoGPT.from_checkpoint(saved)  # the base is there: loads
    torch.save({"other": torch.zeros(1)}, copy)
    with pytest.raises(checkpoints.CheckpointError, match="trained on another version of .*restore the base"):
        PicoGPT.from_checkpoint(saved)
    os.remove(copy)
    with pytest.raises(UserError, match="holds LoRA adapters only, and their base model .* is gone"):
        PicoGPT.from_checkpoint(saved)
    with pytest.raises(UserError, match="lora trains adapters on a pretrained model: set model init_from"):
        LanguageModelModule(tiny_config(), lora=LoraSettings())
    with pytest.raises(UserError, match=r"lora target_modules \['q_proj'\] must be .*unknown: \['q_proj'\]"):
        LoraSettings(target_modules=["q_proj"])


def test_dpo_with_lora_uses_the_base_without_adapters_as_its_reference(base_checkpoint):
    path, _ = base_checkpoint
    module = DPOModule(init_from=str(path), lora=LoraSettings(r=4, alpha=8))
    assert module.reference is None and module.reference_is_base
    with torch.no_grad():  # adapters that are not zero, so policy and reference differ
        for name, param in module.model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    batch = {"input_ids": IDS.repeat(2, 1), "labels": IDS.repeat(2, 1)}
    base = PicoGPT.from_checkpoint(path).eval()
    module.train()
    reference = module.reference_log_probs(batch)
    expected = module.log_probs(base, batch)[1]
    for got, want in zip(reference, expected):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
    assert module.model.training  # the policy goes back to training mode
    policy = module.log_probs(module.model.eval(), batch)[1]
    assert (policy[0] - reference[0]).abs().max() > 1e-3
