"""Peak memory of a CLI batch job for 10k vs 200k prompts: it must not grow with the input.

Builds a tiny random Llama, writes two JSONL inputs (10,000 and 200,000 prompts, all distinct), runs
``simple-generation run`` on each in a subprocess with 1 new token, and prints each run's peak RSS
(``ru_maxrss`` of the child) and wall time. Records are read in windows (``--window-size``, default 10,000)
and written by the ordered writer as they finish, so the peak should be about the same for both.

    python benchmarks/memory.py                 # 10k and 200k prompts
    python benchmarks/memory.py --sizes 2000 40000 --window-size 2000    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_prompts(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            out.write(json.dumps({"id": i, "prompt": f"Prompt number {i}: tell me about {i % 97} things."}) + "\n")


def _run(model: str, source: Path, output: Path, window: int, extra: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MiB of the CLI process, wall seconds, records written)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "simple_generation.cli", "run", model, "--input", str(source),
                    "--output", str(output), "--max-new-tokens", "1", "--temperature", "0", "--quiet",
                    "--no-emissions", "--window-size", str(window), "--batch-size", "256", *extra],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"the CLI failed with exit code {child.returncode}")
    peak = usage.ru_maxrss  # KiB on Linux
    with open(output, "rb") as handle:
        lines = sum(1 for _ in handle)
    return peak / 1024, wall, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--window-size", type=int, default=10_000)
    parser.add_argument("--no-store", action="store_true", help="run without the SQLite store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from simple_generation.tiny import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(root / "tiny", "llama"))
        print(f"model: tiny random Llama; 1 new token per prompt; window {args.window_size}; "
              f"store: {'off' if args.no_store else 'on'}")
        print(f"{'prompts':>9} | {'peak RSS (MiB)':>14} | {'wall (s)':>8} | records written")
        for size in sorted(args.sizes):
            source = root / f"p{size}.jsonl"
            _write_prompts(source, size)
            peak, wall, written = _run(model, source, root / f"out{size}.jsonl", args.window_size,
                                       ["--no-store"] if args.no_store else [])
            print(f"{size:>9} | {peak:>14.0f} | {wall:>8.1f} | {written}")


if __name__ == "__main__":
    main()
