"""Language modelling: next-token cross-entropy, for pretraining and supervised fine-tuning."""

from typing import Optional

from picogpt_lightning import checkpoints
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.base import PicoGPTModule, next_token_loss


class LanguageModelModule(PicoGPTModule):
    """Trains a PicoGPT on next-token prediction; see PicoGPTModule for the optimizer arguments.

    `init_from`: a checkpoint of this project whose weights start the run (fine-tuning). Its
    architecture must match `config`; training-time fields (dropout, neftune_noise_alpha) may differ.
    """

    def __init__(self, config: PicoGPTConfig, init_from: Optional[str] = None, **kwargs):
        super().__init__(config, **kwargs)
        self.save_hyperparameters()
        self.model = PicoGPT(config) if init_from is None else self.load_initial_model(init_from, config)

    @staticmethod
    def load_initial_model(path: str, config: PicoGPTConfig) -> PicoGPT:
        checkpoint = checkpoints.load(path)
        checkpoints.require_unquantized(checkpoint, "init_from (training needs full-precision weights)")
        return PicoGPT.from_checkpoint(checkpoint, config=config)

    def compute_losses(self, batch):
        logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return {"loss": next_token_loss(logits, batch["labels"])}, logits
