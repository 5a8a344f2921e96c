"""Batching variable-length samples: dynamic right padding, attention masks and pre-shifted labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100  # the label that cross_entropy (and transformers) skip


class PadCollator:
    """Turn samples of L+1 token ids into a batch where ``labels[t]`` is the token after ``input_ids[t]``.

    Labels are shifted here, once (nanoGPT/litgpt style), so the model and the loss need no shifting.
    The batch is as wide as its longest input, rounded up to ``pad_to_multiple_of`` if given;
    padded positions get ``pad_token_id`` (0 when None), attention mask 0 and label -100.
    """

    def __init__(self, pad_token_id: int | None = 0, pad_to_multiple_of: int | None = None):
        if pad_token_id is not None and (not isinstance(pad_token_id, int) or pad_token_id < 0):
            raise ValueError(f"pad_token_id must be a token id >= 0 or None, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        # Any id works for padding since the mask hides it; 0 keeps it inside every vocabulary.
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[Sequence[int] | torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise ValueError("cannot collate an empty batch; the sampler yielded no samples")
        sequences = [torch.as_tensor(sample, dtype=torch.long) for sample in samples]
        for i, sequence in enumerate(sequences):
            if sequence.dim() != 1 or sequence.numel() < 2:
                raise ValueError(
                    f"sample {i} has shape {tuple(sequence.shape)}; each sample must be a 1-D list of at least "
                    "2 token ids (inputs are s[:-1], labels s[1:])"
                )

        input_ids = pad_sequence([s[:-1] for s in sequences], batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence([s[1:] for s in sequences], batch_first=True, padding_value=IGNORE_INDEX)
        lengths = torch.tensor([s.numel() - 1 for s in sequences])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()

        if self.pad_to_multiple_of is not None:
            extra = -input_ids.shape[1] % self.pad_to_multiple_of
            input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=self.pad_token_id)
            labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
