"""Data parallelism across the processes of ``accelerate launch`` / ``torchrun``.

Run the same script under a launcher and every process loads its own copy of the model on its own device
(``PartialState().device``). Each call then:

1. splits the prompts across the processes, balanced by total token length (every process computes the
   same split: it depends only on the prompts, which every process holds);
2. runs its share in batches (``batch_size="auto"`` searches per process);
3. exchanges answers with one ``all_gather_object``, so that **every** process returns the complete list in
   input order. Whether each process succeeded rides along in the same exchange: if one fails, every
   process raises (instead of the others waiting forever for its answers).

Without a launcher (``WORLD_SIZE`` unset or 1) nothing of this happens: :class:`SingleProcess` runs
everything, with no process group and no extra work.
"""

from __future__ import annotations

import atexit
import heapq
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DistributedGenerationError

logger = logging.getLogger("simple_generation")

# Variables by which torchrun / accelerate launch (WORLD_SIZE) and MPI launchers announce the process count.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class ShardedRun:
    """What :meth:`SingleProcess.run` / :meth:`DataParallel.run` return.

    ``results`` maps every prompt index (of all processes) to its answer; ``stats`` holds one dict per
    process (rank order) with the numbers ``local_stats`` reported there.
    """

    results: dict[int, Any]
    stats: list[dict[str, Any]] = field(default_factory=list)


def balanced_shards(order: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split ``order`` into ``world_size`` shards of about equal total length.

    Greedy (longest processing time first): each prompt, taken in ``order`` (longest first when sorted),
    goes to the shard with the smallest total so far, ties to the lowest rank. Deterministic, so every
    process computes the same split; each shard keeps the relative ``order`` of its prompts. With fewer
    prompts than processes, the last shards are empty.

    Example:
        >>> balanced_shards([0, 1, 2, 3], [10, 6, 5, 1], 2)
        [[0, 3], [1, 2]]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}.")
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (total length, rank)
    for index in order:
        load, rank = heapq.heappop(loads)
        shards[rank].append(index)
        heapq.heappush(loads, (load + max(int(lengths[index]), 1), rank))
    return shards


class SingleProcess:
    """No process group: this process does all the work."""

    world_size = 1
    rank = 0
    is_main = True
    device = None  # let loading pick

    def load_device(self, device: str | torch.device | None, has_device_map: bool) -> str | torch.device | None:
        """Where to load the model: the user's ``device`` (None: loading picks)."""
        return device

    def barrier(self) -> None:
        """Nothing to wait for."""

    def run(self, order: Sequence[int], lengths: Sequence[int],
            run_shard: Callable[[list[int]], dict[int, Any]],
            local_stats: Callable[[], dict[str, Any]] | None = None) -> ShardedRun:
        """Run ``run_shard`` on this process's share of ``order``: here, all of it."""
        results = run_shard(list(order))
        return ShardedRun(results, [local_stats() if local_stats is not None else {}])

    def __repr__(self) -> str:
        return "SingleProcess()"


class DataParallel:
    """One process of a launched group: a share of every call's prompts, every answer returned.

    Built by :func:`current_distribution` when the script runs under ``accelerate launch`` or
    ``torchrun`` with more than one process. ``device`` is this process's device (``cuda:LOCAL_RANK``
    on GPUs, the CPU with the gloo backend otherwise).
    """

    def __init__(self, state=None):
        if state is None:
            state = _partial_state()
        self.state = state
        self.world_size = int(state.num_processes)
        self.rank = int(state.process_index)
        self.local_rank = int(state.local_process_index)
        self.is_main = bool(state.is_main_process)
        self.device = state.device
        if not self.is_main:
            _quiet_non_main_logging()

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def load_device(self, device: str | torch.device | None, has_device_map: bool) -> str | torch.device | None:
        """This process's device, unless the user placed the model otherwise.

        A bare ``device="cuda"`` means this process's GPU (``cuda:LOCAL_RANK``), not ``cuda:0`` for all.
        With a ``device_map``, each process places its own copy as the map says.
        """
        if has_device_map:
            if self.is_main:
                logger.warning(
                    "device_map with %d processes: each process loads its own copy of the model as the map says "
                    "(device_map='auto' spreads every copy over all visible GPUs). For one copy per GPU, leave "
                    "device_map out; to spread one copy over several GPUs, run a single process.", self.world_size)
            return device
        if device is None:
            return self.device
        requested = torch.device(device)
        if requested.index is None and requested.type == torch.device(self.device).type:
            return self.device
        return device

    def barrier(self) -> None:
        """Wait until every process got here (e.g. every process has read the store)."""
        try:
            torch.distributed.barrier()
        except Exception as err:  # noqa: BLE001 - a peer died
            raise RuntimeError(f"Rank {self.rank} lost contact with the other processes: another process probably "
                               f"died (see its log above). {type(err).__name__}: {err}") from err

    def shards(self, order: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        return balanced_shards(order, lengths, self.world_size)

    def run(self, order: Sequence[int], lengths: Sequence[int],
            run_shard: Callable[[list[int]], dict[int, Any]],
            local_stats: Callable[[], dict[str, Any]] | None = None) -> ShardedRun:
        """Run this process's shard, then exchange answers (or errors) with every other process.

        Exactly one collective per call, on every process, whatever happened in ``run_shard``.
        """
        shards = self.shards(order, lengths)
        mine = shards[self.rank]
        # The same prompts on every process is what makes the split agree; check it in the same exchange.
        fingerprint = (len(order), hash(tuple(order)), hash(tuple(int(n) for n in lengths)))
        local_error: Exception | None = None
        try:
            results = run_shard(mine)
            payload: dict[str, Any] = {"ok": True, "results": results,
                                       "stats": local_stats() if local_stats is not None else {}}
        except Exception as err:  # noqa: BLE001 - reported to every process below, then raised
            local_error = err
            payload = {"ok": False, "error": f"{type(err).__name__}: {err}",
                       "indices": list(getattr(err, "indices", []) or []),
                       "partial": dict(getattr(err, "partial", {}) or {}),
                       "stats": {}}
        payload["fingerprint"] = fingerprint
        gathered = self._all_gather(payload)

        fingerprints = {rank: p["fingerprint"] for rank, p in enumerate(gathered)}
        if len(set(fingerprints.values())) > 1:
            error = RuntimeError(
                "The processes were given different prompts (their number, order or token lengths differ), so "
                "their shares of the work do not fit together. Every process of `accelerate launch` / "
                "`torchrun` must call the generator with the same prompts and arguments."
            )
            raise error from local_error

        failed = {rank: p for rank, p in enumerate(gathered) if not p["ok"]}
        if failed:
            partial: dict[int, Any] = {}
            indices: list[int] = []
            for p in gathered:
                partial.update(p["results"] if p["ok"] else p["partial"])
                indices.extend(p.get("indices", []))
            first_rank, first = next(iter(failed.items()))
            where = "ranks " + ", ".join(str(r) for r in failed) if len(failed) > 1 else f"rank {first_rank}"
            message = (
                f"Generation failed on {where} of {self.world_size} processes (this is rank {self.rank}). "
                f"Rank {first_rank}: {first['error']}"
            )
            if len(failed) > 1:
                message += "".join(f" | Rank {r}: {p['error']}" for r, p in list(failed.items())[1:])
            message += (f" Across all processes {len(partial)} answers were finished: they are on this exception's "
                        "`partial`.")
            error = DistributedGenerationError(message, indices, partial,
                                               {r: p["error"] for r, p in failed.items()})
            raise error from local_error

        merged: dict[int, Any] = {}
        for p in gathered:
            merged.update(p["results"])
        missing = [i for i in order if i not in merged]
        if missing or len(merged) != len(order):
            raise RuntimeError(f"internal error: the processes returned {len(merged)} answers for {len(order)} "
                               f"prompts (missing {missing[:10]})")
        return ShardedRun(merged, [p["stats"] for p in gathered])

    def _all_gather(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        gathered: list[Any] = [None] * self.world_size
        try:
            torch.distributed.all_gather_object(gathered, payload)
        except Exception as err:  # noqa: BLE001 - a peer died (killed, crashed, out of host memory...)
            raise RuntimeError(
                f"Rank {self.rank} lost contact with the other processes while exchanging answers: another "
                f"process probably died (see its log above). {type(err).__name__}: {err}"
            ) from err
        return gathered


def launched_world_size() -> int:
    """How many processes the launcher started (1 when there is no launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return 1
    return 1


def _distributed_accelerator_available() -> bool:
    """Whether there is an accelerator that accelerate would give each process (MPS never is)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        current = accelerator.current_accelerator()
        return current is not None and current.type != "mps"
    return torch.cuda.is_available()


def _use_cpu() -> bool:
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower()
    return flag in ("1", "true", "yes", "y", "on") or not _distributed_accelerator_available()


def _partial_state():
    """accelerate's process state; initialises the process group (gloo on CPUs, nccl on GPUs) if needed."""
    from accelerate import PartialState

    created_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    # Without an accelerator, accelerate only sets up a (gloo) group when told to use the CPU, which
    # `accelerate launch --multi_gpu` / `torchrun` on a GPU-less machine do not say.
    state = PartialState(cpu=_use_cpu())
    if created_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group)
    return state


def _destroy_process_group() -> None:
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass


class _MainProcessOnly(logging.Filter):
    """On processes other than the main one, keep only errors from the library's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _MainProcessOnly()


def _quiet_non_main_logging() -> None:
    """Progress bars and warnings once, from the main process: the other processes keep only errors."""
    library_logger = logging.getLogger("simple_generation")
    if _FILTER not in library_logger.filters:
        library_logger.addFilter(_FILTER)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def current_distribution() -> SingleProcess | DataParallel:
    """:class:`DataParallel` under a launcher with more than one process, else :class:`SingleProcess`."""
    if launched_world_size() <= 1:
        return SingleProcess()
    distribution = DataParallel()
    if distribution.world_size <= 1:
        logger.warning(
            "The environment announces %d processes but no process group could be set up; every process will "
            "generate every answer on its own.", launched_world_size())
        return SingleProcess()
    logger.info("Data parallel: process %d of %d on %s.", distribution.rank, distribution.world_size,
                distribution.device)
    return distribution
