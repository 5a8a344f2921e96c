"""Samples from fixed prompts after each validation, written to TensorBoard."""

from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from picogpt_lightning.errors import UserError
from picogpt_lightning.generation import encode_prompts, generate_texts, resolve_generation_config

SAMPLING = {"do_sample": True, "temperature": 0.8}  # what samples use unless `generation` says otherwise


class SampleGenerationCallback(Callback):
    """After each validation, continues fixed prompts and writes the text to TensorBoard.

    The same seed every time, so samples from successive validations differ only because
    the model has changed. Generation runs on every rank (a sharded model needs all of
    them for a forward pass); only rank zero writes. Training's random state is untouched.

    `generation` holds any further `transformers.GenerationConfig` fields (default: sampling at
    temperature 0.8). In a config: trainer.callbacks: [{class_path:
    picogpt_lightning.callbacks.SampleGenerationCallback, init_args: {prompts: ["ROMEO:"],
    max_new_tokens: 100, generation: {top_k: 40}}}]
    """

    def __init__(
        self,
        prompts: Optional[List[str]] = None,
        max_new_tokens: int = 100,
        seed: int = 1337,
        generation: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.prompts = list(prompts) if prompts else ["\n"]
        if max_new_tokens < 1:
            raise UserError(f"SampleGenerationCallback.max_new_tokens must be >= 1, got {max_new_tokens}")
        options = {**SAMPLING, **(generation or {}), "max_new_tokens": max_new_tokens}
        self.generation_config = resolve_generation_config(**options)
        self.seed = seed

    def on_fit_start(self, trainer, pl_module) -> None:
        # checked here, once the module has its tokenizer, so a bad setting fails before training, not after
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise UserError(
                "SampleGenerationCallback needs the module's tokenizer; train with a datamodule that has one"
            )
        encode_prompts(tokenizer, self.prompts)  # an empty prompt fails now, not after the first epoch
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            rank_zero_warn("SampleGenerationCallback writes to TensorBoard, but no TensorBoardLogger is configured")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        texts = self.generate(pl_module)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for number, text in enumerate(texts):
                    # a code block keeps newlines and spacing in TensorBoard's markdown view
                    logger.experiment.add_text(f"samples/{number}", f"```\n{text}\n```", trainer.global_step)

    def generate(self, pl_module) -> List[str]:
        model = pl_module.model
        was_training = model.training
        device = pl_module.device
        cuda_devices = []
        if device.type == "cuda":
            cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        model.eval()
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(self.seed)
                return generate_texts(model, pl_module.tokenizer, self.prompts, self.generation_config)
        finally:
            model.train(was_training)
