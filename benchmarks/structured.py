"""What structured output costs: constrained vs free generation, continuous engine (scratch benchmark, not a test).

A random checkpoint with SmolLM-135M's shape and vocabulary size (49152 tokens; built by
``benchmarks/shapes.py``: a byte-level BPE padded with added tokens, no EOS in its generation config), the
varied-length workload of ``benchmarks/shapes.py`` (prompts of 3-160 words, long-tailed budgets of 4-128
tokens). Three runs of the continuous engine over the same prompts:

- ``constrained``: every prompt with a JSON schema (``--kind json_schema``; or ``regex``, ``json``); answers end
  when their JSON is complete or at their budget;
- ``free``: no constraint, each prompt's ``max_new_tokens`` set to the number of tokens its constrained answer
  had (no EOS: it runs exactly that long), so both runs generate the same tokens for the same prompts;
- ``mixed``: every other prompt constrained, the others free (the same per-prompt token counts).

Prints wall time and tokens/s of each (the best of ``--repeat``, after a warm-up call that also compiles the
grammar once) and the throughput ratio constrained/free: the grammar's cost is 1 minus it.

    python benchmarks/structured.py --prompts 64 --threads 2
    python benchmarks/structured.py --prompts 200 --model smollm-360m --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
CONSTRAINTS = {"json_schema": {"json_schema": SCHEMA}, "json": {"json": True},
               "regex": {"regex": r"([A-Z][a-z]+ ){1,40}[0-9]{1,5}\."}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--kind", choices=sorted(CONSTRAINTS), default="json_schema")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument("--cache", default="/tmp/sg-shapes", help="where the random checkpoints are kept")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: what SimpleGenerator picks)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from shapes import build, workload

    from simple_generation import SimpleGenerator

    path = build(args.model, Path(args.cache) / args.model)
    texts, budgets = workload("varied")
    texts, budgets = texts[:args.prompts], budgets[:args.prompts]
    kwargs = {"max_slots": args.slots} if args.slots else {}
    if args.device:
        kwargs["device"] = args.device
    gen = SimpleGenerator(str(path), engine="continuous", track_emissions=False, **kwargs)
    constraint = CONSTRAINTS[args.kind]

    def timed(params):
        best, results = float("inf"), None
        for _ in range(args.repeat):
            started = time.perf_counter()
            results = list(gen.generate(texts, params=params, temperature=0, skip_prompt=True,
                                        show_progress_bar=False, dedup=False))
            best = min(best, time.perf_counter() - started)
        return best, results

    # warm-up: the model's first steps and the grammar's compilation (cached per tokenizer and schema)
    started = time.perf_counter()
    list(gen.generate(texts[:4], params=[{"max_new_tokens": 8, **constraint}] * 4, temperature=0,
                      show_progress_bar=False))
    print(f"warm-up with compilation: {time.perf_counter() - started:.2f} s")
    list(gen.generate(texts[:4], max_new_tokens=8, temperature=0, show_progress_bar=False))

    constrained_s, results = timed([{"max_new_tokens": b, **constraint} for b in budgets])
    counts = [len(r.outputs[0].token_ids) for r in results]
    stopped = sum(r.outputs[0].finish_reason == "stop" for r in results)
    free_s, free = timed([{"max_new_tokens": max(1, c)} for c in counts])
    assert [len(r.outputs[0].token_ids) for r in free] == [max(1, c) for c in counts]
    mixed_s, _ = timed([{"max_new_tokens": max(1, c), **(constraint if i % 2 == 0 else {})}
                        for i, c in enumerate(counts)])
    tokens = sum(max(1, c) for c in counts)
    print(f"{args.model}, {len(texts)} prompts, {args.kind}, {tokens} new tokens ({stopped} answers complete, the "
          f"others cut by their budget), {torch.get_num_threads()} threads, device {gen.model.device}")
    for name, seconds in (("free", free_s), ("constrained", constrained_s), ("mixed", mixed_s)):
        print(f"  {name:12s} {seconds:7.2f} s  {tokens / seconds:8.1f} tok/s  ratio to free {free_s / seconds:.3f}")
    print(f"grammar cost: {100 * (1 - free_s / constrained_s):.1f}% of throughput (constrained vs free)")


if __name__ == "__main__":
    main()
