"""Language modelling: next-token cross-entropy, for pretraining and supervised fine-tuning.

Supervised fine-tuning (SFT) is the same loss on prompt/completion samples: the data's labels
are -100 on the prompt (data/preference.py's InstructionDataModule), so only the completion
is learnt, while the prompt still conditions it.
"""

from typing import Optional

from picogpt_lightning.tokenizer_format import same_tokens
from picogpt_lightning import checkpoints
from picogpt_lightning.errors import UserError
from picogpt_lightning.lora import LoraSettings
from picogpt_lightning.losses import next_token_loss
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules.adapters import adapted_model
from picogpt_lightning.modules.base import PicoGPTModule
from picogpt_lightning.tokenizer import Tokenizer


class LanguageModelModule(PicoGPTModule):
    """Trains a PicoGPT on next-token prediction; see PicoGPTModule for the optimizer arguments.

    `init_from`: a checkpoint of this project whose weights start the run (fine-tuning). Its
    architecture must match `config` (training-time fields such as dropout and neftune_noise_alpha may
    differ) and its tokenizer the data's. Its weights are read when a run starts (`setup`), not when
    the module is built: a checkpoint of the fine-tuned run restores its own weights
    (`load_from_checkpoint`), so it never needs the base again. Leave `config` unset to take the
    architecture and the tokenizer from `init_from` (read at once then, and again whenever the
    module is rebuilt from its hyperparameters).

    `lora`: train LoRA adapters on the frozen `init_from` weights instead of every weight
    (`lora.base: nf4` for QLoRA); see picogpt_lightning/lora.py and modules/adapters.py.
    """

    def __init__(
        self, config: Optional[PicoGPTConfig] = None, init_from: Optional[str] = None,
        lora: Optional[LoraSettings] = None, **kwargs,
    ):
        if config is None and init_from is None:
            raise UserError("LanguageModelModule needs a model config, or init_from=<checkpoint> to take one from")
        if lora is not None and init_from is None:
            raise UserError("lora trains adapters on a pretrained model: set model init_from=<checkpoint> as their base")
        start = checkpoints.load(init_from) if config is None or lora is not None else None
        super().__init__(config if start is None else start.resolve_config(config), **kwargs)
        self.save_hyperparameters()
        if lora is None:
            self.model = PicoGPT(self.config)
            self._pending_init_from = start or init_from  # a file already read is not read again at setup
        else:  # the base is read now: a resumed run restores the adapters alone onto it
            self.model, self.lora_entry = adapted_model(start, lora, self.config)
            self._pending_init_from = None
        self._base_tokenizer_dict = None if start is None else start.tokenizer_dict
        if start is not None and start.tokenizer_dict is not None:
            self.tokenizer = Tokenizer.from_dict(start.tokenizer_dict)  # the data may tokenize with it

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._pending_init_from is not None:
            checkpoint = checkpoints.load(self._pending_init_from)
            checkpoints.require_unquantized(checkpoint, "init_from (training needs full-precision weights)")
            checkpoint.resolve_config(self.config)  # same architecture, or a one-line error naming the fields
            checkpoint.load_weights(self.model)
            self.check_tokenizer(checkpoint.path, checkpoint.tokenizer_dict)
            self._pending_init_from = None  # once: a second fit or validate keeps the trained weights
        elif self.lora_entry is not None:
            self.check_tokenizer(self.hparams.init_from, self._base_tokenizer_dict)

    def check_tokenizer(self, path: str, tokenizer_dict: Optional[dict]) -> None:
        # token ids mean nothing under another tokenizer: the same vocabulary size would hide the remapping
        if tokenizer_dict is not None and self.tokenizer is not None:
            if not same_tokens(self.tokenizer.to_dict(), tokenizer_dict):
                raise checkpoints.CheckpointError(
                    f"{path} was trained with another tokenizer than the data's; fine-tune with the "
                    "tokenizer it was trained with (the data module's tokenizer and corpus)"
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_init_from = None  # the checkpoint's own weights replace the starting point

    def compute_losses(self, batch):
        logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return {"loss": next_token_loss(logits, batch["labels"])}, logits
