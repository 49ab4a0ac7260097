"""Data parallelism across the processes of `accelerate launch` / `torchrun`. Stub: filled in by issue 5."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class SingleProcess:
    """No process group: this process does all the work."""

    world_size = 1
    rank = 0
    is_main = True
    device = None  # let loading pick

    def run(self, order: Sequence[int], lengths: Sequence[int],
            run_shard: Callable[[list[int]], dict[int, Any]]) -> dict[int, Any]:
        """Run ``run_shard`` on this process's share of ``order``; return every prompt's result."""
        return run_shard(list(order))


def current_distribution() -> SingleProcess:
    return SingleProcess()
