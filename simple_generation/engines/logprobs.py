"""Log-probabilities for the HF engines (feature: logprobs): from the model's RAW logits (before temperature,
top-p/top-k, penalties or any other logits processor), as vLLM's and OpenAI's default: ``log_softmax`` in
float32, the chosen token's value and the ``k`` most likely tokens, most likely first.

Engines hand back :class:`~simple_generation.results.RawLogprobs` (ids and floats); post-processing decodes
the token texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..results import RawLogprobs


def step_logprobs(logits: torch.Tensor, chosen: Sequence[int], ks: Sequence[int]
                  ) -> list[tuple[float, list[int], list[float]]]:
    """For each row of ``logits`` (rows, vocab): the log-probability of ``chosen[row]`` and the ``ks[row]``
    most likely (id, log-probability) pairs.

    Example:
        >>> step_logprobs(torch.tensor([[0.0, 1.0, 2.0]]), [1], [2])[0][1]
        [2, 1]
    """
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    index = torch.tensor(list(chosen), dtype=torch.long, device=logprobs.device).unsqueeze(1)
    values = logprobs.gather(1, index).squeeze(1).tolist()
    k = min(max(ks, default=0), logprobs.shape[-1])
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    else:
        top_values = top_ids = [[] for _ in values]
    return [(value, ids[:row_k], lps[:row_k]) for value, ids, lps, row_k in zip(values, top_ids, top_values, ks)]


def sequence_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> RawLogprobs:
    """Logprobs of a run of ``tokens``, ``logits[t]`` being the model's logits for ``tokens[t]``."""
    tokens = list(tokens)
    if not tokens:
        return RawLogprobs()
    entries = step_logprobs(logits[: len(tokens)], tokens, [k] * len(tokens))
    return RawLogprobs(tokens, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])


@torch.inference_mode()
def prompt_logprobs(model, token_ids: Sequence[int], k: int, device) -> RawLogprobs:
    """The prompt's tokens from the second on, each given the ones before it: one unbatched forward pass (a
    causal model), so the values are exactly a direct forward's."""
    if len(token_ids) < 2:
        return RawLogprobs()
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
    return sequence_logprobs(logits, token_ids[1:], k)
