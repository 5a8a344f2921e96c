"""Text in, text out: prompts -> left-padded batch -> PicoGPT.generate -> decoded texts.

Shared by `python -m picogpt_lightning generate` and the sample-logging callback.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from picogpt_lightning.errors import UserError


def encode_prompts(tokenizer, prompts: Sequence[str], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompts (with the BOS a Llama's tokenizer adds), left-padded to one length, and the
    mask marking real tokens."""
    encoded = []
    for number, prompt in enumerate(prompts, start=1):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise UserError(f"prompt {number} is empty; give at least one character to continue from")
        encoded.append(ids)
    # the pad value never reaches the model's outputs (the mask hides it); any valid id will do
    pad = next((token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id) if token is not None), 0)
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decode_outputs(tokenizer, outputs: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: Optional[int]) -> List[str]:
    """Prompt + continuation of each output row, without prompt padding, the eos token or what follows it."""
    prompt_len = attention_mask.shape[1]
    copies = outputs.shape[0] // attention_mask.shape[0]  # num_return_sequences rows per prompt
    texts = []
    for row, ids in enumerate(outputs.tolist()):
        prompt_mask = attention_mask[row // copies].tolist()
        prompt = [token for token, keep in zip(ids[:prompt_len], prompt_mask) if keep]
        if prompt[:1] == [tokenizer.bos_token_id] and len(prompt) > 1:  # the BOS encoding added: not the user's text
            prompt = prompt[1:]
        continuation = ids[prompt_len:]
        if eos_token_id is not None and eos_token_id in continuation:
            continuation = continuation[: continuation.index(eos_token_id)]
        texts.append(tokenizer.decode(prompt + continuation))
    return texts


def generate_texts(
    model, tokenizer, prompts: Sequence[str], generation_config=None, stop_at_eos: bool = True, **options
) -> List[str]:
    """Continues every prompt in one batch; returns num_return_sequences texts per prompt, prompt by prompt.

    `model` is a PicoGPT; `generation_config` (a transformers.GenerationConfig) and `options`
    are its generate's; eos and pad ids come from the tokenizer.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, device)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    outputs = model.generate(
        input_ids, attention_mask=attention_mask, generation_config=generation_config, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, **options,
    )
    return decode_outputs(tokenizer, outputs, attention_mask, eos)


PROMPT_CONTEXT = 4  # prompt tokens decoded before the first new one when the prompt is not shown


class IncrementalText:
    """The text of a growing list of token ids, decoded a few tokens at a time.

    Each call decodes only the tokens since the last text it returned, after the tokens of the
    call before as context (as vLLM's incremental detokenizer does: a SentencePiece decoder then
    keeps a word's leading space), so the work per token stays constant however long the text
    grows. A character split over several byte-level tokens is returned once complete (a trailing
    U+FFFD waits for the rest). What it returns adds up to the whole text decoded.
    """

    def __init__(self, tokenizer, ids: Sequence[int] = (), skip: bool = False):
        """`ids` start the sequence; with `skip` their text is context only, never returned."""
        self.tokenizer, self.ids = tokenizer, list(ids)
        self.context = max(0, len(self.ids) - PROMPT_CONTEXT) if skip else 0  # ids[context:done]: decoded before
        self.done = len(self.ids) if skip else 0  # ids before this index are returned as text

    def add(self, ids: Sequence[int], final: bool = False) -> str:
        """The text that `ids` (appended) complete; with `final`, also an unfinished character's bytes."""
        self.ids += ids
        if self.done == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.context : self.done])
        text = self.tokenizer.decode(self.ids[self.context :])
        if not final and text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its other bytes
        self.context, self.done = self.done, len(self.ids)
        return text[len(before) :]


class TextStream:
    """A streamer (generate's `put`/`end`) that hands each new piece of text to `write` as tokens come.

    One sequence: the prompt arrives first (shown too, with `show_prompt`), then each step's token,
    decoded incrementally (IncrementalText): constant work per token.
    """

    def __init__(self, tokenizer, write, show_prompt: bool = True, eos_token_id: Optional[int] = None):
        self.tokenizer, self.write, self.show_prompt, self.eos_token_id = tokenizer, write, show_prompt, eos_token_id
        self.text: Optional[IncrementalText] = None  # made when the prompt arrives
        self.finished = False

    def put(self, token_ids: torch.Tensor) -> None:
        ids = token_ids.reshape(-1).tolist()
        if self.text is None:
            if len(ids) > 1 and ids[0] == self.tokenizer.bos_token_id:
                ids = ids[1:]  # the BOS encoding added (a Llama's tokenizer): not the user's text
            self.text = IncrementalText(self.tokenizer, ids, skip=not self.show_prompt)
            self.emit(self.text.add([]))
            return
        if len(ids) != 1:
            raise ValueError("TextStream follows one sequence; generate a batch without it, or one prompt at a time")
        if self.finished or ids[0] == self.eos_token_id:
            self.finished = True  # the eos token and the padding after it are not text
            return
        self.emit(self.text.add(ids))

    def end(self) -> None:
        if self.text is not None:
            self.emit(self.text.add([], final=True))

    def emit(self, text: str) -> None:
        if text:
            self.write(text)
