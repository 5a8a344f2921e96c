"""Language modelling: next-token cross-entropy, for pretraining and supervised fine-tuning."""

from typing import Optional

from picogpt_lightning import checkpoints
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.base import PicoGPTModule, next_token_loss


class LanguageModelModule(PicoGPTModule):
    """Trains a PicoGPT on next-token prediction; see PicoGPTModule for the optimizer arguments.

    `init_from`: a checkpoint of this project whose weights start the run (fine-tuning). Its
    architecture must match `config` (training-time fields such as dropout and neftune_noise_alpha may
    differ) and its tokenizer the data's.
    """

    def __init__(self, config: PicoGPTConfig, init_from: Optional[str] = None, **kwargs):
        super().__init__(config, **kwargs)
        self.save_hyperparameters()
        self.init_from = init_from
        self.init_tokenizer = None  # the tokenizer the starting weights were trained with
        if init_from is None:
            self.model = PicoGPT(config)
        else:
            checkpoint = checkpoints.load(init_from)
            self.model = PicoGPT.from_checkpoint(checkpoint, config=config)
            self.init_tokenizer = checkpoint.tokenizer_dict

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # token ids mean nothing under another tokenizer: the same vocabulary size would hide the remapping
        if self.init_tokenizer is not None and self.tokenizer is not None and self.tokenizer.to_dict() != self.init_tokenizer:
            raise checkpoints.CheckpointError(
                f"{self.init_from} was trained with another tokenizer than the data's; fine-tune with the data and "
                "tokenizer it was trained with"
            )

    def compute_losses(self, batch):
        logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return {"loss": next_token_loss(logits, batch["labels"])}, logits
