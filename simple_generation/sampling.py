"""Reproducible sampling: each sequence draws its own noise from (seed, sequence number, step).

``torch.multinomial`` over a batch draws from one global generator, so a sampled answer depends on
its batch neighbours, its position and how many processes ran. Here sampling is the Gumbel-max trick:
``argmax(warped_logits + Gumbel noise)`` is an exact sample of ``softmax(warped_logits)``, and the
noise for sequence ``j`` of a request at decoding step ``t`` comes from a generator seeded with
``mix(seed, j, t)`` alone. The same (prompt, parameters, seed) thus gives the same answer at any
batch size, in any position, after a resume and on any number of processes.

Engines use :func:`seeded_processor` with decoding switched to greedy (``do_sample=False``): the
processor applies the temperature/top-k/top-p/min-p warping and adds the noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_MASK = (1 << 63) - 1


def mix(seed: int, sequence: int, step: int) -> int:
    """A 63-bit generator seed from (request seed, sequence number, decoding step)."""
    value = (int(seed) & _MASK) * 0x9E3779B97F4A7C15
    value += (sequence + 1) * 0xBF58476D1CE4E5B9 + (step + 1) * 0x94D049BB133111EB
    value ^= value >> 31
    return value & _MASK


def gumbel_noise(seed: int, sequence: int, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape ``(vocab_size,)`` (float32, on the CPU) for one sequence and step."""
    generator = torch.Generator().manual_seed(mix(seed, sequence, step))
    uniform = torch.rand(vocab_size, generator=generator, dtype=torch.float64)
    return (-torch.log(-torch.log(uniform.clamp_(1e-12, 1 - 1e-12)))).float()


def warpers(config: GenerationConfig) -> list[LogitsProcessor]:
    """The sampling warpers ``config`` asks for, in transformers' order."""
    found: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        found.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        found.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        found.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if getattr(config, "min_p", None) is not None:
        found.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return found


class SeededSampler(LogitsProcessor):
    """Warp the scores, then add each row's own Gumbel noise; greedy decoding then picks a sample.

    ``rows`` gives, for each row of the batch (after ``num_return_sequences`` expansion), its
    ``(seed, sequence number)``; the decoding step is counted by the processor (one call per step).
    """

    def __init__(self, config: GenerationConfig, rows: Sequence[tuple[int, int]]):
        self.warp = LogitsProcessorList(warpers(config))
        self.rows = list(rows)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.rows):
            raise RuntimeError(f"SeededSampler: {scores.shape[0]} rows for {len(self.rows)} seeds")
        scores = self.warp(input_ids, scores.float())
        noise = torch.stack([gumbel_noise(seed, sequence, self.step, scores.shape[-1])
                             for seed, sequence in self.rows]).to(scores.device)
        self.step += 1
        return scores + noise


def greedy_config(config: GenerationConfig) -> GenerationConfig:
    """A copy of ``config`` that decodes greedily (the sampler supplies the randomness)."""
    import copy

    greedy = copy.deepcopy(config)
    greedy.do_sample = False
    for key in ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
        setattr(greedy, key, None)
    return greedy
