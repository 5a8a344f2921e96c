"""Language modelling: next-token cross-entropy, for pretraining and supervised fine-tuning.

Supervised fine-tuning (SFT) is the same loss on prompt/completion samples: the data's labels
are -100 on the prompt (data/preference.py's InstructionDataModule), so only the completion
is learnt, while the prompt still conditions it.
"""

from typing import Optional

from picogpt_lightning import checkpoints
from picogpt_lightning.data.tokenizer import Tokenizer
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.base import PicoGPTModule, next_token_loss


class LanguageModelModule(PicoGPTModule):
    """Trains a PicoGPT on next-token prediction; see PicoGPTModule for the optimizer arguments.

    `init_from`: a checkpoint of this project whose weights start the run (fine-tuning). Leave
    `config` unset to take the checkpoint's architecture (and its tokenizer); a `config` given
    must describe the same architecture, training-time fields (dropout, neftune_noise_alpha) may differ.
    """

    def __init__(self, config: Optional[PicoGPTConfig] = None, init_from: Optional[str] = None, **kwargs):
        if config is None and init_from is None:
            raise ValueError("LanguageModelModule needs a model config, or init_from=<checkpoint> to take one from")
        start = checkpoints.load(init_from) if init_from is not None else None
        config = start.resolve_config(config) if start is not None else config
        super().__init__(config, **kwargs)
        self.save_hyperparameters()
        self.model = PicoGPT(config) if start is None else PicoGPT.from_checkpoint(start, config=config)
        if start is not None and start.tokenizer_dict is not None:
            self.tokenizer = Tokenizer.from_dict(start.tokenizer_dict)  # the data may tokenize with it

    def compute_losses(self, batch):
        logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return {"loss": next_token_loss(logits, batch["labels"])}, logits
