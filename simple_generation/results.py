"""What a generation call produces: one :class:`GenerationResult` per prompt (its sequences as
:class:`CompletionOutput` objects), and a :class:`RunSummary`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RawLogprobs:
    """Log-probabilities of a run of tokens, as engines give them (ids and floats; texts are decoded later).

    Parallel lists, one entry per token: ``token_ids`` (the token), ``logprobs`` (its log-probability, a
    log-softmax of the model's raw logits), ``top_ids``/``top_logprobs`` (the ``k`` most likely tokens at that
    position, most likely first; empty lists when ``k == 0``).
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def cut(self, length: int) -> RawLogprobs:
        """The first ``length`` tokens' entries."""
        return RawLogprobs(self.token_ids[:length], self.logprobs[:length], self.top_ids[:length],
                           self.top_logprobs[:length])


@dataclass
class TopLogprob:
    """One of the ``k`` most likely tokens at a position: its id, its text and its log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """A token of an answer (or of the prompt) with its log-probability and the ``k`` most likely tokens at its
    position (``top``, most likely first; empty for ``logprobs=0``). Log-probabilities are the log-softmax of
    the model's raw logits, before temperature, top-p/top-k and penalties (vLLM's and OpenAI's default).

    Example:
        >>> out = gen.generate(["Hi"], max_new_tokens=4, logprobs=2)[0].outputs[0]   # doctest: +SKIP
        >>> out.logprobs[0]                                                          # doctest: +SKIP
        TokenLogprob(token_id=12, token=' Hello', logprob=-0.41, top=[TopLogprob(12, ' Hello', -0.41), ...])
    """

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of the ``n`` sequences generated for a prompt (``num_return_sequences``), as vLLM's ``CompletionOutput``.

    ``index``: its place among the prompt's sequences; ``text``: the answer (the prompt in front unless
    ``skip_prompt``; stop strings cut); ``token_ids``: the generated token ids (never the prompt's);
    ``finish_reason``: ``"stop"`` (end of sequence), ``"length"`` (max_new_tokens or the context reached) or
    ``"stop_string"``; ``logprobs``: with ``logprobs=k``, one :class:`TokenLogprob` per token of ``token_ids``
    (else None).

    Example:
        >>> result = gen.generate(["Hi"], max_new_tokens=8, num_return_sequences=2)[0]   # doctest: +SKIP
        >>> [(o.index, o.text, o.finish_reason) for o in result.outputs]                   # doctest: +SKIP
        [(0, ' Hello!', 'stop'), (1, ' Hi there', 'length')]
    """

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # feature: reasoning: the text between the model's reasoning markers (``<think>...</think>``), markers and
    # the newlines around it left out; ``text`` is then the answer without it. None: no reasoning block.
    reasoning: str | None = None


@dataclass
class GenerationResult:
    """The outcome for one prompt of a call.

    ``outputs`` holds the ``n`` generated sequences (``num_return_sequences``), one
    :class:`CompletionOutput` each; ``text`` is the first one's text, None when the prompt failed
    (``error`` then says why) or was removed as a near-duplicate (``duplicate_of`` names the kept prompt).
    ``texts``, ``token_ids`` and ``finish_reasons`` list the outputs' fields. ``cached``: taken from the
    store, not generated in this call.

    Example:
        >>> results = gen.generate(["Hi", "What is 2 + 2?"], max_new_tokens=8)   # doctest: +SKIP
        >>> results[1].text, results[1].finish_reason, results[1].completion_tokens   # doctest: +SKIP
        (' Four.', 'stop', 3)
        >>> results[1].outputs[0].token_ids   # doctest: +SKIP
        [12, 873, 2]
    """

    index: int
    prompt: str = ""
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    duplicate_of: int | None = None
    cached: bool = False
    # feature: logprobs: with prompt_logprobs=k, one entry per prompt token; the first is None (no context)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def texts(self) -> list[str]:
        """The text of each output."""
        return [output.text for output in self.outputs]

    @property
    def token_ids(self) -> list[list[int]]:
        """The generated token ids of each output."""
        return [output.token_ids for output in self.outputs]

    @property
    def finish_reasons(self) -> list[str | None]:
        """The finish reason of each output."""
        return [output.finish_reason for output in self.outputs]

    @property
    def text(self) -> str | None:
        return self.outputs[0].text if self.outputs else None

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None

    # feature: reasoning
    @property
    def reasoning(self) -> str | None:
        """The first output's reasoning (the text of its ``<think>...</think>`` block), None without one.

        Example:
            >>> result = gen.generate(["What is 2 + 2?"], max_new_tokens=256)[0]   # doctest: +SKIP
            >>> result.reasoning, result.text                                        # doctest: +SKIP
            ('The user asks for 2 + 2, which is 4.', 'Four.')
        """
        return self.outputs[0].reasoning if self.outputs else None

    @property
    def answer(self) -> str | list[str] | None:
        """What ``gen(...)`` returns for this prompt: the text, or the list of texts when ``n > 1``."""
        if self.error is not None or self.duplicate_of is not None:
            return None
        return self.outputs[0].text if len(self.outputs) == 1 else self.texts

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunSummary:
    """Numbers of the last call, available afterwards as ``SimpleGenerator.last_run``.

    Example:
        >>> answers = gen(prompts)                               # doctest: +SKIP
        >>> gen.last_run.tokens_per_second                       # doctest: +SKIP
    """

    prompts: int = 0
    sequences: int = 0
    generated_tokens: int = 0
    wall_time_s: float = 0.0
    batch_size: int = 0        # the static engine's (last) batch size, the continuous engine's slots
    batches: int = 0           # static: batches run; continuous: prefill batches (admissions of waiting prompts)
    forward_passes: int = 0    # continuous: prefills + decoding steps (0 for engines that do not count them)
    oom_retries: int = 0
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None
    engine: str = ""
    engine_reason: str = ""
    cached: int = 0            # answers taken from the store
    deduplicated: int = 0      # prompts answered by another identical prompt's generation
    near_duplicates: int = 0   # prompts removed by near-duplicate detection
    failed: int = 0            # prompts whose result has an error
    capped: int = 0            # prompts whose new tokens were capped by the context length
    failures: list[tuple[int, str]] = field(default_factory=list)
    peak_rss_mb: float | None = None   # peak resident memory of the process during the call (Linux: the call's own)
    peak_cuda_mb: float | None = None  # peak CUDA memory allocated during the call, all devices (None without CUDA)
    prefix_caching: bool | None = None  # the engine reused shared prefixes' KV (None: it has no such cache)
    prompt_tokens: int = 0             # prompt tokens the engine prefilled or reused (0: not counted)
    prefix_cached_tokens: int = 0      # of those, tokens taken from the prefix cache instead of computed

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens reused from the prefix cache / prompt tokens (0.0 when none were counted)."""
        return self.prefix_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
