"""SampleGenerationCallback: samples from fixed prompts at each validation, in TensorBoard."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from picogpt_lightning import PicoGPTConfig
from picogpt_lightning.callbacks import SampleGenerationCallback
from picogpt_lightning.tokenizer import build_tokenizer
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.generation import generate_texts

TEXT = "to be, or not to be, that is the question:\nwhether 'tis nobler in the mind to suffer\n" * 4



def tensorboard_texts(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(event.step, tensor_util.make_ndarray(event.tensor_proto).item().decode()) for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def test_sample_callback_writes_each_validation_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    tokenizer = build_tokenizer("char", TEXT)
    config = PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_embd=32, n_head=4)
    module = LanguageModelModule(config, learning_rate=1e-2, warmup_steps=0)
    module.tokenizer = tokenizer
    ids = torch.tensor(tokenizer.encode(TEXT))
    batches = [{"input_ids": ids[i : i + 32], "labels": ids[i + 1 : i + 33]} for i in range(0, 256, 32)]
    callback = SampleGenerationCallback(prompts=["to be", "whether"], max_new_tokens=20, seed=3)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1, logger=logger, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(batches, batch_size=4), DataLoader(batches, batch_size=4))

    texts = tensorboard_texts(logger.log_dir)
    assert sorted(texts) == ["samples/0/text_summary", "samples/1/text_summary"]
    steps = [step for step, _ in texts["samples/0/text_summary"]]
    assert steps == [2, 4]  # one sample per validation, none for the sanity check
    # the last validation saw the final weights: same seed, same text
    torch.manual_seed(3)
    module.model.eval()
    expected = generate_texts(module.model, tokenizer, ["to be", "whether"], max_new_tokens=20, do_sample=True, temperature=0.8)
    assert [texts[f"samples/{n}/text_summary"][-1][1] for n in (0, 1)] == [f"```\n{text}\n```" for text in expected]
    assert texts["samples/0/text_summary"][0][1] != texts["samples/0/text_summary"][1][1]  # the model learned


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_sample_callback_refuses_an_empty_prompt_before_training(tmp_path):
    tokenizer = build_tokenizer("char", TEXT)
    module = LanguageModelModule(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_embd=16, n_head=2))
    module.tokenizer = tokenizer
    callback = SampleGenerationCallback(prompts=["to be", ""], max_new_tokens=16)
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    ids = torch.tensor(tokenizer.encode(TEXT))[:17]
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        trainer.fit(module, DataLoader([{"input_ids": ids[:-1], "labels": ids[1:]}]))
    assert trainer.global_step == 0
