"""Language modelling: next-token cross-entropy, for pretraining and supervised fine-tuning."""

from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.base import PicoGPTModule, next_token_loss


class LanguageModelModule(PicoGPTModule):
    """Trains a PicoGPT on next-token prediction; see PicoGPTModule for the optimizer arguments."""

    def __init__(self, config: PicoGPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.save_hyperparameters()
        self.model = PicoGPT(config)

    def compute_losses(self, batch):
        logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return {"loss": next_token_loss(logits, batch["labels"])}, logits
