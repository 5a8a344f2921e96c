"""compile: true trains through torch.compile, and its checkpoints load into an uncompiled model."""

import torch

from picogpt_lightning import PicoGPT
from picogpt_lightning.checkpoints import COMPILE_PREFIX
from picogpt_lightning.modules import LanguageModelModule
from tiny_training import BLOCK_SIZE, quiet_trainer, seed_everything, tiny_config, tiny_datamodule


def test_compiled_training_writes_checkpoints_that_load_without_compile(corpus_path, tmp_path):
    # one test on purpose: a cold torch.compile costs tens of seconds on CPU
    seed_everything()
    model = LanguageModelModule(tiny_config(), compile=True, lr_decay_steps=2)
    trainer = quiet_trainer(max_steps=2, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=tiny_datamodule(corpus_path, batch_size=4))
    assert model.model._compiled_call_impl is not None  # Module.compile swapped in a compiled __call__
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
