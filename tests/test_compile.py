"""compile: true trains through torch.compile, and its checkpoints load without compile.

The training loss (model and loss function) must trace into one graph, with and without a
padding mask: a graph break or a host sync in the step would cost every step. The graph tests
trace with dynamo only (CompileCounter, no code generation), which is what finds breaks and
recompilations, in seconds; one test runs the real compiler.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from picogpt_lightning import PicoGPT
from picogpt_lightning.checkpoints import COMPILE_PREFIX
from picogpt_lightning.data import PadCollator, TinyShakespeareDataModule
from picogpt_lightning.modules import DistillationModule, LanguageModelModule
from tiny_training import BLOCK_SIZE, SEED, quiet_trainer, seed_everything, tiny_config, tiny_datamodule


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test counts its own compilations
    yield
    torch._dynamo.reset()


def batch(padded: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    if not padded:  # blocks mode: equal lengths, so the collator sends no mask
        return PadCollator()(torch.randint(0, 65, (3, BLOCK_SIZE + 1), generator=generator))
    lengths = (BLOCK_SIZE + 1, 9, 20)
    return PadCollator()([torch.randint(0, 65, (n,), generator=generator) for n in lengths])


def distillation_module(tmp_path) -> DistillationModule:
    teacher = str(tmp_path / "teacher.pt")
    PicoGPT(tiny_config(n_layer=4, n_embd=48, n_head=4, n_query_groups=2)).save(teacher)
    # every loss term on, hidden-state projection included, so each masked mean is traced
    return DistillationModule(tiny_config(), teacher=teacher, alpha_ce=0.5, alpha_kd=1.0, alpha_cos=0.5)


@pytest.mark.parametrize("padded", [False, True], ids=["no mask", "padding mask"])
@pytest.mark.parametrize("recipe", ["lm", "distill"])
def test_training_loss_compiles_to_one_graph(tmp_path, recipe, padded):
    torch.manual_seed(SEED)
    module = LanguageModelModule(tiny_config()) if recipe == "lm" else distillation_module(tmp_path)
    module.train()
    inputs = batch(padded)
    assert ("attention_mask" in inputs) == padded
    counter = CompileCounter()
    compiled = torch.compile(module.compute_losses, backend=counter, fullgraph=True)  # a break would raise

    losses, _ = compiled(inputs)
    losses["loss"].backward()
    assert counter.frame_count == 1
    expected, _ = module.compute_losses(inputs)  # the eager step, a second path to the same numbers
    assert losses.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], msg=name)


def test_bucketed_speech_batches_do_not_recompile_step_after_step(corpus_path):
    datamodule = TinyShakespeareDataModule(
        data_path=str(corpus_path), mode="speeches", block_size=BLOCK_SIZE, batch_size=4,
        group_by_length=True, pad_to_multiple_of=16, seed=SEED,
    )  # fmt: skip
    datamodule.setup("fit")
    padded = [b for b in datamodule.train_dataloader() if "attention_mask" in b]
    short = [b for b in padded if b["input_ids"].shape[1] == 16][:4]
    long = [b for b in padded if b["input_ids"].shape[1] == 32][:4]
    assert len(short) == len(long) == 4  # the speeches' lengths fall into both buckets
    batches = [b for pair in zip(short, long) for b in pair]  # the width changes every step
    module = LanguageModelModule(tiny_config())
    counter = CompileCounter()
    compiled = torch.compile(module.compute_losses, backend=counter, fullgraph=True)

    def epoch():
        for inputs in batches:
            compiled(inputs)[0]["loss"].backward()

    epoch()
    compiled_in_first_epoch = counter.frame_count
    epoch()
    assert counter.frame_count == compiled_in_first_epoch  # the second pass reuses every graph
    assert compiled_in_first_epoch <= 2  # at most one graph per width, not one per step


def test_compiled_training_writes_checkpoints_that_load_without_compile(corpus_path, tmp_path):
    # one test on purpose: a cold torch.compile costs tens of seconds on CPU
    seed_everything()
    model = LanguageModelModule(tiny_config(), compile=True, lr_decay_steps=2)
    trainer = quiet_trainer(max_steps=2, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=tiny_datamodule(corpus_path, batch_size=4))
    assert model.compiled_losses is not None  # the step ran through the compiled loss
    assert model.model._compiled_call_impl is None  # the model itself stays eager, for generation
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)

    state_dict = torch.load(path, weights_only=False)["state_dict"]
    assert not [key for key in state_dict if COMPILE_PREFIX in key]

    input_ids = torch.randint(0, 65, (2, BLOCK_SIZE))  # training mode, grad on: the graph already compiled
    expected = model.model(input_ids).logits.detach()
    # load_from_checkpoint runs configure_model, so compile=False overrides the stored hparam
    from_module = LanguageModelModule.load_from_checkpoint(path, compile=False).model
    for loaded in (PicoGPT.from_checkpoint(str(path)), from_module):
        assert loaded._compiled_call_impl is None
        loaded.train()
        torch.testing.assert_close(loaded(input_ids).logits.detach(), expected, atol=1e-5, rtol=1e-5)


def test_checkpoints_of_a_torch_compile_wrapped_model_resume(corpus_path, tmp_path):
    """A run that wrapped the model itself (`torch.compile(model)`) stored `_orig_mod.` keys: they still resume."""
    seed_everything()
    model = LanguageModelModule(tiny_config(), lr_decay_steps=4)
    datamodule = tiny_datamodule(corpus_path, batch_size=4)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, datamodule=datamodule)
    checkpoint_path = tmp_path / "wrapped.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["state_dict"] = {
        key.replace("model.", f"model.{COMPILE_PREFIX}", 1): value for key, value in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, checkpoint_path)

    resumed = LanguageModelModule(tiny_config(), lr_decay_steps=4)
    quiet_trainer(max_steps=2).fit(resumed, datamodule=datamodule, ckpt_path=checkpoint_path)
    assert resumed.trainer.global_step == 2
    loaded = LanguageModelModule.load_from_checkpoint(checkpoint_path).model
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
