"""What signing a checkpoint's content costs: the first load (every file hashed) vs later loads (cached).

Builds a random Llama of about 500 MB (float32 safetensors) and, each in a fresh process (so nothing is
remembered in memory), times the store identity of the folder (``identity.sources``) and a whole
``SimpleGenerator`` load, first with an empty hash cache and then with the cache filled.

    python benchmarks/identity.py                      # ~500 MB
    python benchmarks/identity.py --layers 2           # a quicker look (~100 MB)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TIMED = textwrap.dedent("""
    import sys, time
    started = time.perf_counter()
    if sys.argv[1] == "identity":
        from simple_generation.identity import sources
        sources(sys.argv[2])
    else:
        from simple_generation import SimpleGenerator
        SimpleGenerator(sys.argv[2], device="cpu", track_emissions=False)
    print(f"{time.perf_counter() - started:.2f}")
""")


def timed(what: str, path: Path, cache: Path) -> float:
    env = dict(os.environ, SIMPLE_GENERATION_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", TIMED, what, str(path)], env=env, check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=11)
    args = parser.parse_args()
    from simple_generation.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(Path(tmp) / "model", "llama", hidden=args.hidden, layers=args.layers, heads=8)
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(f"checkpoint: {size:.0f} MB in {path}")
        for what in ("identity", "load"):
            cache = Path(tmp) / f"cache-{what}"
            first = timed(what, path, cache)
            later = min(timed(what, path, cache) for _ in range(3))
            print(f"{what:8s}: first {first:.2f} s (every file hashed), later {later:.2f} s (cache)")


if __name__ == "__main__":
    main()
