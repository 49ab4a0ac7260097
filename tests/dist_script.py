"""Run under ``accelerate launch`` by tests/test_distributed.py: every rank writes what it got.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_script.py MODEL OUT_DIR --case 11:4 --case 1:4

Each ``--case N:BATCH`` generates greedily for the first N of ``PROMPTS`` (BATCH an integer or ``auto``)
and stores the answers (``N:BATCH:oom``: rank 1 runs out of memory on every batch of more than 2 prompts;
``:store``: with a store in OUT_DIR; ``:seed``: seeded sampling; ``:emptyon1``: rank 1 gets no prompts;
``:prefix``: every prompt begins with ``PREFIX``);
the rank writes ``OUT_DIR/rank{R}.json``. ``--fail-rank R`` makes generation raise
on rank R (``--crash-rank R``: the process dies without a word, as if killed); the ranks that raise write
``OUT_DIR/rank{R}.error.json`` with the error before re-raising.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tests.prompts import PROMPTS as _SHARED  # noqa: E402 - the repository root is on PYTHONPATH

PROMPTS = [*_SHARED, "What is the most popular programming language?"]
PREFIX = "Answer briefly and precisely, as a careful assistant would. "
MAX_NEW_TOKENS = 6


def _failing_processor(rank: int, crash: bool):
    from transformers import LogitsProcessor, LogitsProcessorList

    class FailOnRank(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if int(os.environ.get("RANK", "0")) == rank:
                if crash:
                    os._exit(3)  # no exception, no traceback: the process just disappears
                raise RuntimeError(f"injected failure on rank {rank}")
            return scores

    return LogitsProcessorList([FailOnRank()])


def _out_of_memory_processor(rank: int, limit: int):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class OutOfMemoryOnRank(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if int(os.environ.get("RANK", "0")) == rank and input_ids.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return scores

    return LogitsProcessorList([OutOfMemoryOnRank()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out_dir")
    parser.add_argument("--case", action="append", default=[], help="N:BATCH, e.g. 11:4 or 3:auto")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--emissions-dir", default=None, help="track emissions into this folder")
    args = parser.parse_args(argv)

    from simple_generation import SimpleGenerator

    generator = SimpleGenerator(args.model, track_emissions=args.emissions_dir is not None,
                                emissions_dir=args.emissions_dir or ".")
    distribution = generator.distribution
    out = Path(args.out_dir)
    record = {"rank": distribution.rank, "world_size": distribution.world_size, "is_main": distribution.is_main,
              "device": str(generator.model.device), "kind": type(distribution).__name__, "cases": {},
              "last_run": {}}
    extra = {}
    if args.fail_rank is not None or args.crash_rank is not None:
        failing = args.fail_rank if args.fail_rank is not None else args.crash_rank
        extra["logits_processor"] = _failing_processor(failing, crash=args.crash_rank is not None)
    try:
        for case in args.case:
            n, batch, *flags = case.split(":")
            batch_size = batch if batch == "auto" else int(batch)
            kwargs = dict(extra)
            if "oom" in flags:
                kwargs["logits_processor"] = _out_of_memory_processor(rank=1, limit=2)
            if "store" in flags:
                kwargs["store"] = str(out / "store.sqlite")
            if "seed" in flags:
                kwargs.update(do_sample=True, temperature=1.0, seed=2024)
            else:
                kwargs["temperature"] = 0
            prompts = PROMPTS[: int(n)]
            if "prefix" in flags:
                prompts = [PREFIX + prompt for prompt in prompts]
            if "emptyon1" in flags and distribution.rank == 1:
                prompts = []
            answers = generator(prompts, batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS,
                                show_progress_bar=False, **kwargs)
            assert len(answers) == len(prompts)
            record["cases"][case] = answers
            run = generator.last_run
            record["last_run"][case] = {"prompts": run.prompts, "generated_tokens": run.generated_tokens,
                                        "batches": run.batches, "forward_passes": run.forward_passes,
                                        "batch_size": run.batch_size,
                                        "oom_retries": run.oom_retries, "energy_kwh": run.energy_kwh,
                                        "cached": run.cached, "engine": run.engine,
                                        "prefix_cached_tokens": run.prefix_cached_tokens}
    except Exception as err:
        (out / f"rank{distribution.rank}.error.json").write_text(json.dumps(
            {"type": type(err).__name__, "message": str(err),
             "failed_ranks": {str(k): v for k, v in getattr(err, "failed_ranks", {}).items()}}))
        raise
    (out / f"rank{distribution.rank}.json").write_text(json.dumps(record, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
