"""Direct Preference Optimization: a policy learns to prefer the chosen completion over the rejected one.

    loss = -log sigmoid(beta * [(log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))])

(Rafailov et al., 2023; `losses.dpo_loss` has the IPO and hinge variants and conservative
DPO's label smoothing). The policy starts from a checkpoint of this project (`init_from`),
whose architecture and tokenizer it takes, so a recipe repeats no model config. The reference
is what the policy is held close to, as a ratio of likelihoods:

- by default a frozen copy of the starting policy;
- `reference`: another checkpoint (same vocabulary; any architecture);
- `precompute_reference: true`: its log-probs are computed once, before training, for every
  train and validation example, and looked up by the example's index; no reference model stays
  in memory during training.

DPO alone may lower the likelihood of the chosen completions too, as long as the rejected ones
fall faster; on a small model that drains probability into tokens neither side uses and the
text degrades. `rpo_alpha` adds the next-token loss on the chosen completions (trl's
`rpo_alpha`, Pang et al., 2024), which keeps the policy a language model.

With `lora`, the policy is the starting checkpoint with LoRA adapters, and the reference by
default is that same model with its adapters switched off (trl's way): one model in memory.

Either way the reference runs in eval mode without gradients, is not in the optimizer and not
in this module's checkpoints (it is rebuilt from its path). Chosen and rejected completions go
through each model in one padded batch (PreferenceDataModule puts every chosen row first).
"""

from typing import Optional

import torch

from picogpt_lightning import checkpoints
from picogpt_lightning.errors import UserError
from picogpt_lightning.lora import LoraSettings, adapters_disabled
from picogpt_lightning.losses import check_dpo_options, dpo_loss, next_token_loss, sequence_log_probs
from picogpt_lightning.model import PicoGPT
from picogpt_lightning.modules.adapters import adapted_model
from picogpt_lightning.modules.base import PicoGPTModule
from picogpt_lightning.modules.data_link import IndexedData, attached_datamodule
from picogpt_lightning.modules.flops import flops_per_token
from picogpt_lightning.tokenizer import Tokenizer


class DPOModule(PicoGPTModule):
    """Trains `self.model` (the policy) with the DPO loss against a frozen reference.

    Args:
        init_from: a checkpoint of this project (.ckpt or PicoGPT.save file) to start the policy from.
        reference: the reference model's checkpoint; None: the starting policy (init_from).
        precompute_reference: compute the reference's log-probs once before training instead of
            keeping the reference model in memory (needs data with example indices, as
            PreferenceDataModule gives).
        beta: how far the policy may move from the reference (higher: less far); trl's default 0.1.
        label_smoothing: the assumed share of mislabelled pairs (conservative DPO), sigmoid loss only.
        loss_type: "sigmoid" (DPO), "ipo" (log-probs averaged over tokens) or "hinge".
        rpo_alpha: weight of the next-token loss on the chosen completions added to the DPO loss
            (None: DPO alone; the RPO paper uses 1.0).
        lora: train LoRA adapters on the frozen init_from weights (picogpt_lightning/lora.py); the
            reference is then the policy without its adapters unless `reference` names another.
        **kwargs: optimizer and schedule arguments of PicoGPTModule.
    """

    progress_bar_losses = ("loss", "rewards/accuracies")  # rewards and log-probs: TensorBoard

    def __init__(
        self,
        init_from: str,
        reference: Optional[str] = None,
        precompute_reference: bool = False,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        rpo_alpha: Optional[float] = None,
        lora: Optional[LoraSettings] = None,
        **kwargs,
    ):
        check_dpo_options(beta, label_smoothing, loss_type)
        if rpo_alpha is not None and not rpo_alpha > 0:
            raise UserError(f"rpo_alpha must be > 0, or None to train on the DPO loss alone; got {rpo_alpha}")
        start = checkpoints.load(init_from)
        super().__init__(start.resolve_config(), **kwargs)
        self.save_hyperparameters()
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.rpo_alpha = rpo_alpha
        if lora is None:
            self.model = PicoGPT.from_checkpoint(start)
        else:
            self.model, self.lora_entry = adapted_model(start, lora)
        if start.tokenizer_dict is not None:
            self.tokenizer = Tokenizer.from_dict(start.tokenizer_dict)
        self.reference_path = init_from if reference is None else reference
        self.reference = None
        # (example index, [chosen, rejected]) log-probs, filled before training; rebuilt, not saved
        self.register_buffer("reference_table", torch.empty(0, 2), persistent=False)
        # with adapters, the starting policy is the policy with its adapters off: no second model
        self.reference_is_base = lora is not None and reference is None and not precompute_reference
        if not (precompute_reference or self.reference_is_base):
            self.add_frozen("reference", self.load_reference(start if reference is None else reference))

    def load_reference(self, source) -> PicoGPT:
        reference = PicoGPT.from_checkpoint(source)
        if reference.config.vocab_size != self.config.vocab_size:
            raise UserError(
                f"the reference's vocabulary has {reference.config.vocab_size} tokens but the policy's has "
                f"{self.config.vocab_size}; pass a reference trained with the policy's tokenizer"
            )
        return reference

    # ---- log-probs of the completions ---------------------------------------------------

    def log_probs(self, model, batch):
        """(logits, (chosen, rejected) log-probs) of `model` on a batch whose first half is chosen.

        No attention mask: the batches are right-padded, so causal attention already keeps every
        real token from the pads after it and positions count from 0 either way; without a mask
        SDPA takes its causal fast path and the step needs no look at the mask's values (no host sync).
        """
        logits = model(batch["input_ids"]).logits
        return logits, sequence_log_probs(logits, batch["labels"], average=self.loss_type == "ipo").chunk(2)

    def reference_log_probs(self, batch):
        if self.reference_is_base:
            with torch.no_grad(), adapters_disabled(self.model):
                return self.log_probs(self.model, batch)[1]
        if self.reference is None:
            if self.reference_table.numel() == 0:
                raise RuntimeError("the reference log-probs are not computed yet; the Trainer does it on fit start")
            table = self.reference_table[batch["index"]]
            return table[:, 0], table[:, 1]
        with torch.no_grad():
            return self.log_probs(self.reference, batch)[1]

    def compute_losses(self, batch):
        logits, (chosen, rejected) = self.log_probs(self.model, batch)
        reference_chosen, reference_rejected = self.reference_log_probs(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, reference_chosen, reference_rejected, self.beta, self.label_smoothing, self.loss_type
        )
        parts = {}
        loss = losses.mean()
        if self.rpo_alpha is not None:  # the chosen rows are the batch's first half
            pairs = chosen.shape[0]
            parts["nll"] = next_token_loss(logits[:pairs], batch["labels"][:pairs])
            loss = loss + self.rpo_alpha * parts["nll"]
        return {
            "loss": loss,
            **parts,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }, logits

    def evaluation_losses(self, batch, losses, logits):
        # next-token loss on the chosen completions (the batch's first half): what the policy should write
        pairs = batch["input_ids"].shape[0] // 2
        nll = losses["nll"] if "nll" in losses else next_token_loss(logits[:pairs], batch["labels"][:pairs])
        return {"loss": nll, "objective": losses["loss"], **{k: v for k, v in losses.items() if k != "loss"}}

    def loss_items(self, batch) -> torch.Tensor:
        # the DPO loss and the rewards are means over pairs (rpo_alpha's nll, a mean over chosen
        # tokens, rides along with the same weight)
        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)

    def module_flops_per_token(self, seq_len: int, training: bool) -> int:
        reference_config = self.config if self.reference_is_base else getattr(self.reference, "config", None)
        reference = 0 if reference_config is None else flops_per_token(reference_config, seq_len, training=False)
        return super().module_flops_per_token(seq_len, training) + reference

    # ---- precomputed reference log-probs ------------------------------------------------

    def on_fit_start(self) -> None:
        self.precompute_reference()

    def on_validation_start(self) -> None:
        self.precompute_reference()  # a `validate` run has no fit start

    def on_test_start(self) -> None:
        self.precompute_reference()

    @torch.no_grad()
    def precompute_reference(self) -> None:
        if self.reference is not None or self.reference_is_base or self.reference_table.numel() > 0:
            return
        datamodule = attached_datamodule(self)
        if not isinstance(datamodule, IndexedData):
            raise UserError("precompute_reference needs data with example indices, e.g. PreferenceDataModule")
        reference = self.load_reference(self.reference_path).to(self.device).eval()
        loaders = datamodule.ordered_dataloaders()
        table = torch.full((sum(len(loader.dataset) for loader in loaders), 2), float("nan"), device=self.device)
        for loader in loaders:
            for batch in loader:
                batch = {key: value.to(self.device) for key, value in batch.items()}
                # the precision the reference would run in during training (autocast for mixed precision)
                with self.trainer.precision_plugin.forward_context():
                    chosen, rejected = self.log_probs(reference, batch)[1]
                table[batch["index"]] = torch.stack([chosen, rejected], dim=-1).float()
        self.reference_table = table
