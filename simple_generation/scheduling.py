"""Order prompts, cut them into batches and shrink the batch on out-of-memory.

Prompts are sorted longest first: padding is minimal inside a batch, and the batch most likely to run
out of memory comes first, so ``batch_size="auto"`` settles its size early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

logger = logging.getLogger("simple_generation")

R = TypeVar("R")


def is_out_of_memory(err: BaseException) -> bool:
    """True for an accelerator or CPU out-of-memory error, whatever its wording."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, Exception) and should_reduce_batch_size(err))


class BatchGenerationError(RuntimeError):
    """Generation failed for one batch. ``partial`` maps prompt index to the answers already finished."""

    def __init__(self, message: str, indices: Sequence[int], partial: dict[int, object]):
        super().__init__(message)
        self.indices = list(indices)
        self.partial = partial


def length_order(lengths: Sequence[int], sort: bool = True) -> list[int]:
    """Prompt indices in processing order: longest first when ``sort`` (stable), else input order."""
    indices = list(range(len(lengths)))
    if sort:
        indices.sort(key=lambda i: -lengths[i])
    return indices


def resolve_batch_size(batch_size: int | str, starting_batch_size: int, n_prompts: int) -> tuple[int, bool]:
    """The first batch size to try and whether it was chosen automatically."""
    if batch_size == "auto":
        if not isinstance(starting_batch_size, int) or isinstance(starting_batch_size, bool) \
                or starting_batch_size < 1:
            raise ValueError(f"starting_batch_size must be a positive integer, got {starting_batch_size!r}.")
        return max(1, min(starting_batch_size, n_prompts)), True
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer or "auto", got {batch_size!r}.')
    return min(batch_size, max(1, n_prompts)), False


class BatchRunner(Generic[R]):
    """Runs ``run_batch`` over ``order`` in batches, halving the batch on out-of-memory.

    Only the batch that failed is retried; finished batches are kept. The size that worked is kept for
    the rest of the run and exposed as ``batch_size``.
    """

    def __init__(self, run_batch: Callable[[list[int]], list[R]], batch_size: int, auto: bool):
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.auto = auto
        self.oom_retries = 0

    def run(self, order: Sequence[int], on_batch_done: Callable[[list[int], list[R]], None] | None = None
            ) -> dict[int, R]:
        results: dict[int, R] = {}
        position = 0
        while position < len(order):
            indices = list(order[position : position + self.batch_size])
            try:
                outputs = self.run_batch(indices)
            except Exception as err:
                if is_out_of_memory(err) and self.batch_size > 1:
                    new_size = max(1, len(indices) // 2)
                    logger.warning(
                        "Out of memory at batch size %d: retrying this batch at %d (%d prompts already done).",
                        len(indices), new_size, len(results),
                    )
                    if not self.auto:
                        logger.warning('batch_size=%d did not fit; use batch_size="auto" to search for the '
                                       "largest size that does.", len(indices))
                    self.batch_size = new_size
                    self.oom_retries += 1
                    del err
                    clear_device_cache(garbage_collection=True)
                    continue
                hint = (
                    " Out of memory at batch size 1: lower max_new_tokens, load in lower precision or "
                    "quantized, or spread the model with device_map='auto'."
                    if is_out_of_memory(err) else ""
                )
                raise BatchGenerationError(
                    f"Generation failed for the batch of prompts {indices}: {type(err).__name__}: {err}.{hint} "
                    f"The {len(results)} answers already finished are on this exception's `partial`.",
                    indices,
                    dict(results),
                ) from err
            if len(outputs) != len(indices):
                raise RuntimeError(f"internal error: {len(outputs)} outputs for {len(indices)} prompts")
            for index, output in zip(indices, outputs):
                results[index] = output
            if on_batch_done is not None:
                on_batch_done(indices, outputs)
            position += len(indices)
        return results
