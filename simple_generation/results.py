"""What a generation call did, available afterwards as ``SimpleGenerator.last_run``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunSummary:
    """Numbers of the last call.

    Example:
        >>> answers = gen(prompts)                               # doctest: +SKIP
        >>> gen.last_run.tokens_per_second                       # doctest: +SKIP
    """

    prompts: int = 0
    sequences: int = 0
    generated_tokens: int = 0
    wall_time_s: float = 0.0
    batch_size: int = 0
    batches: int = 0
    oom_retries: int = 0
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
