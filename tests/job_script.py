"""A job run as a real process by tests/test_resume.py (killed with SIGKILL mid-run, then rerun).

    python -m tests.job_script MODEL STORE OUT.json [--sample]

Generates for ``PROMPTS * 3`` with a store at STORE, batch size 2, and writes every answer and the
run's counts to OUT.json when it finishes.
"""

from __future__ import annotations

import json
import sys

from tests.prompts import PROMPTS

JOB = [f"{i}: {p}" for i, p in enumerate(PROMPTS * 3)]


def main() -> int:
    from simple_generation import SimpleGenerator

    model, store, out = sys.argv[1:4]
    sample = "--sample" in sys.argv
    gen = SimpleGenerator(model, device="cpu", track_emissions=False)
    kwargs = {"do_sample": True, "temperature": 1.0, "seed": 17} if sample else {"temperature": 0}
    answers = gen(JOB, store=store, batch_size=2, max_new_tokens=24, min_new_tokens=24, skip_prompt=True,
                  show_progress_bar=False, **kwargs)
    run = gen.last_run
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"answers": answers, "cached": run.cached, "generated": run.prompts - run.cached}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
