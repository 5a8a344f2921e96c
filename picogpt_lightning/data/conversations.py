"""trl's conversational formats, turned into prompt and completion text through the tokenizer's chat template.

- `messages`: a whole conversation; the prompt is every turn before the last (an assistant's), the
  completion that last turn;
- `prompt` (and `completion`, or `chosen` and `rejected`) as message lists: the prompt's turns, then
  each completion's, as trl's `apply_chat_template` renders them.

A completion's text is what the template adds after the prompt with its generation prompt, so
prompt + completion is the whole rendered conversation. Rendered text already holds the template's
special tokens (a Llama's BOS): it is tokenized without adding more, while a plain-text prompt gets
what the tokenizer adds to a text.
"""

from __future__ import annotations

from collections.abc import Sequence

from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer

MESSAGES = "messages"


def is_conversational(value) -> bool:
    return isinstance(value, list)


def as_text(batch: dict, tokenizer: Tokenizer, completion_columns: Sequence[str]) -> tuple[dict, list[bool]]:
    """({"prompt": texts, column: texts...}, whether each example was rendered through the template)."""
    count = len(next(iter(batch.values())))
    texts = {column: [] for column in ("prompt", *completion_columns)}
    templated = []
    for i in range(count):
        if MESSAGES in batch:
            prompt, completions = split_conversation(batch[MESSAGES][i], completion_columns)
        else:
            prompt, completions = batch["prompt"][i], [batch[column][i] for column in completion_columns]
        rendered = is_conversational(prompt)
        if rendered:
            prompt, completions = render(tokenizer, prompt, completions)
        texts["prompt"].append(prompt)
        for column, completion in zip(completion_columns, completions):
            texts[column].append(completion)
        templated.append(rendered)
    return texts, templated


def split_conversation(messages: list, completion_columns: Sequence[str]) -> tuple[list, list]:
    if tuple(completion_columns) != ("completion",):
        raise UserError("a 'messages' column is SFT's format; DPO needs prompt, chosen and rejected (message lists or text)")
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise UserError("each 'messages' conversation must end with an assistant turn: the completion learnt")
    return messages[:-1], [messages[-1:]]


def render(tokenizer: Tokenizer, prompt: list, completions: list) -> tuple[str, list[str]]:
    if not prompt:
        raise UserError("a conversational example needs at least one turn before the completion")
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    rendered = []
    for completion in completions:
        if not is_conversational(completion):
            raise UserError("a conversational prompt needs its completions as message lists too, as trl writes them")
        whole = tokenizer.apply_chat_template(prompt + completion, add_generation_prompt=False)
        if not whole.startswith(prompt_text):
            raise UserError(
                "the chat template renders the prompt differently once a reply follows it; "
                "use a template whose generation prompt is the start of the assistant's turn"
            )
        rendered.append(whole[len(prompt_text):])
    return prompt_text, rendered
