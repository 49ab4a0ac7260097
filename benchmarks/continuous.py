"""Continuous vs static batching on a varied-length workload (scratch benchmark, not a test).

A random Llama built locally; ``--prompts`` prompts of 3-150 random tokens (log-uniform) whose answer
budgets are long-tailed between 4 and 128 new tokens (per-request ``max_new_tokens``; no EOS, so
every answer runs to its budget, which is what natural EOS stops cost). In one process:

- ``hf-unsorted``: plain HF batching, input order, batches of ``--batch-size``, each batch run to its
  longest budget;
- ``hf-sorted``: the same, prompts sorted by length (today's static engine);
- ``continuous``: :class:`~simple_generation.engines.continuous.ContinuousEngine` with ``--slots``.

Prints wall time, useful tokens/s, ratios against ``hf-unsorted`` and ``hf-sorted``, and whether the
continuous answers equal the sorted static ones token for token.

    python benchmarks/continuous.py --threads 2
    python benchmarks/continuous.py --threads 1 --slots 16 32 64
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from simple_generation.engines.continuous import ContinuousEngine
from simple_generation.requests import GenerationParams, Request


def workload(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    lengths = [int(round(3 * (150 / 3) ** rng.random())) for _ in range(n)]
    # long-tailed budgets: most answers short, a few long (a Pareto-like draw clipped to 4..128)
    budgets = [min(128, max(4, int(4 / (1 - rng.random()) ** 0.9))) for _ in range(n)]
    prompts = [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]
    return prompts, budgets


@torch.inference_mode()
def hf_batches(model, prompts, budgets, batch_size, sort):
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if sort else list(range(len(prompts)))
    answers = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        longest = max(budgets[i] for i in idx)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        for row, i in enumerate(idx):
            answers[i] = out[row, width:width + budgets[i]].tolist()
    return answers


@torch.inference_mode()
def continuous(model, prompts, budgets, slots, refill):
    params = GenerationParams(config=GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0),
                              call_kwargs={}, stop_strings=(), seed=None, fingerprint="bench")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    engine = ContinuousEngine(model, None, max_slots=slots, refill_fraction=refill)
    return {r.id: out.sequences[0] for r, out in engine.run(requests)}, engine.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--slots", type=int, nargs="+", default=[32])
    parser.add_argument("--refill", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--skip-unsorted", action="store_true")
    parser.add_argument("--fixed", type=int, default=0, help="every budget this many tokens (fixed-length workload)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, initializer_range=0.2, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    prompts, budgets = workload(args.prompts, config.vocab_size)
    if args.fixed:
        budgets = [args.fixed] * len(budgets)
    useful = sum(budgets)
    print(f"model {params:.0f}M params, {args.threads} threads; {len(prompts)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), budgets {min(budgets)}-{max(budgets)} "
          f"(mean {useful / len(budgets):.1f}), {useful} useful tokens")

    results = {}

    def report(name, seconds, extra=""):
        results[name] = seconds
        base = results.get("hf-sorted")
        ratio = f"  x{base / seconds:.2f} vs hf-sorted" if base else ""
        unsorted = results.get("hf-unsorted")
        ratio += f"  x{unsorted / seconds:.2f} vs hf-unsorted" if unsorted else ""
        print(f"{name:18s} {seconds:8.1f} s  {useful / seconds:8.1f} tok/s{ratio} {extra}", flush=True)

    continuous(model, prompts[:8], [4] * 8, 8, args.refill)  # warm-up
    # the machine is shared: every configuration runs --repeat times, interleaved; the fastest run counts
    best: dict[str, float] = {}
    extras: dict[str, str] = {}
    static = None
    for _ in range(args.repeat):
        if not args.skip_unsorted:
            start = time.perf_counter()
            hf_batches(model, prompts, budgets, args.batch_size, sort=False)
            best["hf-unsorted"] = min(best.get("hf-unsorted", 1e9), time.perf_counter() - start)
        start = time.perf_counter()
        static = hf_batches(model, prompts, budgets, args.batch_size, sort=True)
        best["hf-sorted"] = min(best.get("hf-sorted", 1e9), time.perf_counter() - start)
        for slots in args.slots:
            start = time.perf_counter()
            answers, stats = continuous(model, prompts, budgets, slots, args.refill)
            name = f"continuous/{slots}"
            best[name] = min(best.get(name, 1e9), time.perf_counter() - start)
            same = sum(answers[i] == static[i] for i in range(len(prompts)))
            extras[name] = f"  ({stats.batches} forward passes; {same}/{len(prompts)} answers equal hf-sorted)"
    for name, seconds in best.items():
        report(name, seconds, extras.get(name, ""))

if __name__ == "__main__":
    main()
