"""Batching variable-length samples: dynamic right padding, attention masks and pre-shifted labels.

PadCollator batches plain token sequences; PromptCompletionCollator batches prompt/completion
examples on top of it, with the prompt's labels masked so only completions are learnt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from picogpt_lightning.errors import UserError
from picogpt_lightning.losses import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "INDEX_COLUMN", "PadCollator", "PromptCompletionCollator"]

INDEX_COLUMN = "index"  # each example's position across splits: DPO looks up precomputed reference log-probs by it


class PadCollator:
    """Turn samples of L+1 token ids into a batch where ``labels[t]`` is the token after ``input_ids[t]``.

    Labels are shifted here, once (nanoGPT/litgpt style), so the model and the loss need no shifting.
    The batch is as wide as its longest input, rounded up to ``pad_to_multiple_of`` if given (but
    never past ``max_length``): a few bucketed widths let a compiled model keep a few graphs instead
    of compiling one per width. Padded positions get ``pad_token_id`` (0 when None), attention mask 0
    and label -100. A batch with no padding carries no ``attention_mask`` at all: the collator knows
    that from the samples' lengths, so the model need not inspect the mask on the device (a host
    sync) to take its unmasked, causal-only attention path. Samples may also come as one
    (batch, L+1) tensor of equal-length rows, as ``TokenWindows`` fetches them.
    """

    def __init__(
        self, pad_token_id: int | None = 0, pad_to_multiple_of: int | None = None, max_length: int | None = None
    ):
        if pad_token_id is not None and (not isinstance(pad_token_id, int) or pad_token_id < 0):
            raise UserError(f"pad_token_id must be a token id >= 0 or None, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise UserError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise UserError(f"max_length must be a positive int or None, got {max_length!r}")
        # Any id works for padding since the mask hides it; 0 keeps it inside every vocabulary.
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, samples: Sequence[Sequence[int] | torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise UserError("cannot collate an empty batch; the sampler yielded no samples")
        if isinstance(samples, torch.Tensor) and samples.dim() == 2 and samples.shape[1] >= 2:
            samples = samples.long()
            lengths = [samples.shape[1] - 1] * len(samples)
            return self._pad({"input_ids": samples[:, :-1], "labels": samples[:, 1:]}, lengths)
        sequences = [torch.as_tensor(sample, dtype=torch.long) for sample in samples]
        for i, sequence in enumerate(sequences):
            if sequence.dim() != 1 or sequence.numel() < 2:
                raise UserError(
                    f"sample {i} has shape {tuple(sequence.shape)}; each sample must be a 1-D list of at least "
                    "2 token ids (inputs are s[:-1], labels s[1:])"
                )
        lengths = [sequence.numel() - 1 for sequence in sequences]
        batch = {
            "input_ids": pad_sequence([s[:-1] for s in sequences], batch_first=True, padding_value=self.pad_token_id),
            "labels": pad_sequence([s[1:] for s in sequences], batch_first=True, padding_value=IGNORE_INDEX),
        }
        return self._pad(batch, lengths)

    def _pad(self, batch: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, torch.Tensor]:
        """Widen to the bucketed width and add the attention mask, if any position is padding."""
        width = batch["input_ids"].shape[1]
        extra = 0
        if self.pad_to_multiple_of is not None:
            extra = -width % self.pad_to_multiple_of
            if self.max_length is not None:
                extra = max(0, min(extra, self.max_length - width))
        if extra == 0 and min(lengths) == width:
            return {"input_ids": batch["input_ids"], "labels": batch["labels"]}
        input_ids = F.pad(batch["input_ids"], (0, extra), value=self.pad_token_id)
        labels = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        attention_mask = (torch.arange(width + extra) < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PromptCompletionCollator:
    """Batches {prompt_ids, <completion>_ids...} samples: each completion is appended to its prompt
    and the sequences are padded by PadCollator; labels that would predict a prompt token are -100.

    For preference data (completions "chosen", "rejected") the batch stacks every chosen
    sequence, then every rejected one: one forward pass over 2B rows scores both.
    """

    def __init__(self, completions: Sequence[str], pad_token_id: int | None = 0):
        self.completions = tuple(completions)
        self.pad = PadCollator(pad_token_id=pad_token_id)

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences, prompt_lengths = [], []
        for column in self.completions:
            for sample in samples:
                sequences.append(list(sample["prompt_ids"]) + list(sample[f"{column}_ids"]))
                prompt_lengths.append(len(sample["prompt_ids"]))
        batch = self.pad(sequences)
        # labels[t] is token t + 1, so the first len(prompt) - 1 labels are prompt tokens
        positions = torch.arange(batch["labels"].shape[1])
        prompt_labels = positions < torch.tensor(prompt_lengths)[:, None] - 1
        batch["labels"] = batch["labels"].masked_fill(prompt_labels, IGNORE_INDEX)
        if INDEX_COLUMN in samples[0]:
            batch[INDEX_COLUMN] = torch.tensor([sample[INDEX_COLUMN] for sample in samples], dtype=torch.long)
        return batch
