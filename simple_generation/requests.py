"""What travels along the one path every answer takes: requests in, engine outputs out.

formatting -> tokenize/validate -> :class:`Request` -> store lookup -> dedup -> engine ->
:class:`EngineOutput` -> post-processing -> store commit -> fan-out. Engines only ever see
``Request`` objects and only ever produce ``EngineOutput`` objects; templates, the store, files and
decoding happen outside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import GenerationConfig

from .results import RawLogprobs

FinishReason = Literal["stop", "length", "stop_string"]


def token_id_list(value: Any) -> list[int]:
    """A generation config's token id setting (None, an int, a list or a tensor) as a list of ints."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True, eq=False)
class GenerationParams:
    """Resolved generation settings shared by every request made with them.

    ``config`` is the full transformers ``GenerationConfig`` (model defaults, our defaults and the
    caller's overrides merged; its ``max_new_tokens`` is the requested budget, :attr:`max_new_tokens`,
    from which the planner sets each request's own: engines read :attr:`Request.max_new_tokens`, never
    this one). ``call_kwargs`` are extra ``model.generate``
    arguments (``logits_processor``, ``streamer``...): HF engines pass them on, others refuse them.
    ``fingerprint`` is a canonical string of everything in ``config``/``stop_strings``/``seed`` that
    can change an answer: equal fingerprints mean requests may share a batch and a store key.
    """

    config: GenerationConfig
    call_kwargs: Mapping[str, Any]
    stop_strings: tuple[str, ...]
    seed: int | None
    fingerprint: str
    batch_key: str = ""  # the fingerprint without max_new_tokens and seed: what may share one batch
    # logprobs (feature: logprobs): k most likely alternatives per generated / prompt token (None: not asked)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # structured output (feature: structured output): a simple_generation.constrained.Constraint, None: free text
    constraint: Any = None

    @property
    def max_new_tokens(self) -> int:
        """The requested budget (a request may get less: :attr:`Request.max_new_tokens`, which engines read)."""
        return int(self.config.max_new_tokens)

    @property
    def num_return_sequences(self) -> int:
        return int(self.config.num_return_sequences or 1)

    @property
    def sampled(self) -> bool:
        return bool(self.config.do_sample)

    @property
    def num_beams(self) -> int:
        return int(self.config.num_beams or 1)

    @property
    def deterministic(self) -> bool:
        """Greedy or beam search: the same prompt always gets the same answer."""
        return not self.sampled


@dataclass
class Request:
    """One prompt's work for an engine.

    ``id`` is unique within one call (engines yield it back); ``max_new_tokens`` is this request's
    own budget (the parameters' value, capped by the room the model's context leaves); ``seed`` is the
    request's own sampling seed (None: the engine's global RNG), from which sequence ``j`` of the
    request draws its noise (see :mod:`simple_generation.sampling`), so a sampled answer depends only
    on (prompt, parameters, seed).
    """

    id: int
    token_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    seed: int | None = None
    key: str = ""
    # image-text models: a simple_generation.vision.PromptMedia that loads this prompt's images or processor tensors
    # (pixels, image sizes/grids) when its batch runs (None: a text-only prompt)
    media: Any = None


@dataclass
class EngineOutput:
    """What an engine returns for one request.

    ``sequences`` holds ``params.num_return_sequences`` lists of new token ids, each at most
    ``request.max_new_tokens`` long; an engine may leave anything after the first EOS in them
    (post-processing trims). ``finish_reasons`` is filled when the engine knows better than
    "ended with EOS or not" (e.g. it stopped on a stop string itself); None lets post-processing
    decide. ``error`` (with empty ``sequences``) when this request could not run.

    ``logprobs`` (when ``params.logprobs`` is set): one :class:`RawLogprobs` per sequence, entry ``t`` for
    token ``t`` of that sequence (post-processing trims it with the sequence). ``prompt_logprobs`` (when
    ``params.prompt_logprobs`` is set): the prompt's tokens from the second on (the first has no context).
    """

    sequences: list[list[int]] = field(default_factory=list)
    finish_reasons: list[FinishReason | None] | None = None
    error: str | None = None
    logprobs: list[RawLogprobs] | None = None
    prompt_logprobs: RawLogprobs | None = None
