"""Logits processing: transformers' own processors, in transformers' order."""

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def logits_processors(config: GenerationConfig, min_tokens_to_keep: int = 1) -> LogitsProcessorList:
    """transformers' processing of next-token scores, in its order: repetition penalty, then
    (sampling only) temperature, top-k, top-p. Call as processors(sequences, scores, counted_positions=mask)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(PaddingAwareRepetitionPenalty(config.repetition_penalty))
    if config.do_sample:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep=min_tokens_to_keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=min_tokens_to_keep))
    return processors


class PaddingAwareRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty, with prompt padding left out of "already in the sequence".

    transformers' processor counts every id in the sequence, so a pad id that is also a real
    token would be penalised for padding; here uncounted positions point at one extra score
    column, penalised and dropped again. Kept by hand for that correctness only.
    """

    def __init__(self, penalty: float):
        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, counted_positions=None) -> torch.Tensor:
        if counted_positions is None:
            return self.penalty(input_ids, scores)
        vocab_size = scores.shape[-1]
        tokens = input_ids.masked_fill(counted_positions == 0, vocab_size)
        padded_scores = torch.cat((scores, scores.new_zeros(scores.shape[0], 1)), dim=-1)
        return self.penalty(tokens, padded_scores)[:, :vocab_size]
