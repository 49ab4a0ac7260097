"""What a generation call produces: one :class:`GenerationResult` per prompt, and a :class:`RunSummary`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    """The outcome for one prompt of a call.

    ``texts`` holds the ``n`` answers (``num_return_sequences``); ``text`` is the first, None when the
    prompt failed (``error`` then says why) or was removed as a near-duplicate (``duplicate_of``
    names the kept prompt). ``cached``: taken from the store, not generated in this call.

    Example:
        >>> results = gen.generate(["Hi", "What is 2 + 2?"], max_new_tokens=8)   # doctest: +SKIP
        >>> results[1].text, results[1].finish_reason, results[1].completion_tokens   # doctest: +SKIP
        (' Four.', 'stop', 3)
    """

    index: int
    prompt: str = ""
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    duplicate_of: int | None = None
    cached: bool = False

    @property
    def text(self) -> str | None:
        return self.texts[0] if self.texts else None

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None

    @property
    def answer(self) -> str | list[str] | None:
        """What ``gen(...)`` returns for this prompt: the text, or the list of texts when ``n > 1``."""
        if self.error is not None or self.duplicate_of is not None:
            return None
        return self.texts[0] if len(self.texts) == 1 else list(self.texts)

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

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
