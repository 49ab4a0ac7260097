"""Batch sizes and out-of-memory detection (the errors a failing batch raises live in :mod:`.errors`)."""

from __future__ import annotations

import logging

import torch

# re-exported: older code imports them from here
from .errors import BatchFailed, BatchGenerationError, GenerationInterrupted  # noqa: F401

logger = logging.getLogger("simple_generation")

# Wordings of out-of-memory errors across CUDA, cuBLAS, ROCm, MPS, XPU and the CPU allocator.
_OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_not_supported",  # cuDNN's answer when it cannot allocate its workspace
    "can't allocate memory",
    "dml_allocator",
    "hip out of memory",
    "mps backend out of memory",
    "xpu out of memory",
)


def is_out_of_memory(err: BaseException) -> bool:
    """True for an accelerator or host out-of-memory error, whatever its wording.

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA error: out of memory"))
        True
    """
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(err, RuntimeError) or not err.args or not isinstance(err.args[0], str):
        return False
    message = err.args[0].lower()
    return any(fragment in message for fragment in _OOM_MESSAGES)


def release_memory() -> None:
    """Give cached accelerator memory back after an out-of-memory error."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


# On a CPU the matrix units saturate at small batches, and a wide batch of sorted prompts pays for
# its padding and for rows that finished early: "auto" starts here unless told otherwise.
CPU_AUTO_BATCH = 16
ACCELERATOR_AUTO_BATCH = 256


def resolve_batch_size(batch_size: int | str, starting_batch_size: int | None, n_prompts: int,
                       on_cpu: bool = False) -> tuple[int, bool]:
    """The first batch size to try and whether it was chosen automatically."""
    if batch_size == "auto":
        if starting_batch_size is None:
            starting_batch_size = CPU_AUTO_BATCH if on_cpu else ACCELERATOR_AUTO_BATCH
        if not isinstance(starting_batch_size, int) or isinstance(starting_batch_size, bool) \
                or starting_batch_size < 1:
            raise ValueError(f"starting_batch_size must be a positive integer, got {starting_batch_size!r}.")
        return max(1, min(starting_batch_size, n_prompts)), True
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer or "auto", got {batch_size!r}.')
    return min(batch_size, max(1, n_prompts)), False
