"""Throughput of simple-generation's engines against plain HF batching, on one machine, in one run.

Builds a random Llama locally (no download) and runs two workloads:

* **varied**: prompts of mixed length whose answers have long-tailed lengths (per-prompt budgets of
  4-128 new tokens). A random model's greedy output rarely hits EOS, so each prompt's answer length is
  given as its ``max_new_tokens`` and forced with ``min_new_tokens``: plain HF batches run to the
  longest answer of the batch, which is what natural EOS stops cost them.
* **fixed**: the same prompts, every answer exactly ``--fixed-new-tokens`` tokens.

Methods: plain HF ``generate`` in input order (batch 16), HF on length-sorted batches, our static and
continuous engines, and our default (``SimpleGenerator(path)`` with no engine or batch size named). It
reports wall time, tokens/s, speed-up over plain HF batching, the fraction of the machine's measured
fp32 matmul peak each method reaches, and whether our answers equal HF's unbatched greedy answers.
``--bf16`` adds how many greedy answers batching changes in bfloat16.

    python benchmarks/throughput.py                  # ~100M parameters, 200 prompts
    python benchmarks/throughput.py --quick          # small smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from simple_generation import SimpleGenerator
from simple_generation.tiny import build_tiny_checkpoint

WORDS = ("the quick brown fox jumps over lazy dog write poem style sea sky mountains dawn tell me what is two "
         "plus translate sentence spanish library runs text generation model prompts researchers evaluate "
         "engineers data training once upon time small learned answer questions").split()


def make_prompts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 160) -> list[str]:
    rng = random.Random(seed)
    # log-uniform lengths: many short prompts, a few long ones, as in real evaluation sets
    lengths = [int(round(min_words * (max_words / min_words) ** rng.random())) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def long_tailed_budgets(n: int, seed: int = 1, low: int = 4, high: int = 128) -> list[int]:
    rng = random.Random(seed)
    return [int(round(low * (high / low) ** (rng.random() ** 2))) for _ in range(n)]


def matmul_peak(dtype=torch.float32, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square matmul on this machine (the best of a few runs)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best


def hf_batches(model, tokenizer, prompts, budgets, batch_size, order):
    """Plain HF: batches of ``batch_size`` in ``order``, each run to its longest answer."""
    answers = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True)
        longest = max(budgets[i] for i in chunk)
        out = model.generate(**inputs, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(new[row, : budgets[i]], skip_special_tokens=True)
    return answers


def hf_unbatched(model, tokenizer, prompts, budgets):
    answers = []
    for prompt, budget in zip(prompts, budgets):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=budget, min_new_tokens=budget, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def ours(generator, prompts, budgets, **kwargs):
    params = [{"max_new_tokens": b} for b in budgets]
    mins = max(budgets)
    return generator(prompts, params=params, min_new_tokens=mins, max_new_tokens=mins, temperature=0,
                     skip_prompt=True, show_progress_bar=False, dedup=False, **kwargs)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_workload(name, prompts, budgets, model, tokenizer, generators, batch_size, peak, params, prompt_tokens,
                 reference):
    rows = []
    plain_order = list(range(len(prompts)))
    sorted_order = sorted(plain_order, key=lambda i: -prompt_tokens[i])
    with torch.inference_mode():
        hf_plain, t_plain = timed(lambda: hf_batches(model, tokenizer, prompts, budgets, batch_size, plain_order))
        rows.append((f"plain HF generate, batches of {batch_size}, input order", t_plain, hf_plain))
        hf_sorted, t_sorted = timed(lambda: hf_batches(model, tokenizer, prompts, budgets, batch_size, sorted_order))
        rows.append((f"HF generate, batches of {batch_size}, sorted by length", t_sorted, hf_sorted))
        for label, generator, kwargs in generators:
            answers, seconds = timed(lambda g=generator, k=kwargs: ours(g, prompts, budgets, **k))
            rows.append((label, seconds, answers))
    new_tokens = sum(budgets)
    # FLOPs of the useful work: 2 * params per token of prompt and answer (attention ignored)
    useful_flops = 2 * params * (sum(prompt_tokens) + new_tokens)
    print(f"\n### {name}: {len(prompts)} prompts, answers of {min(budgets)}-{max(budgets)} tokens "
          f"({new_tokens} in all)\n")
    print("| method | wall time (s) | tokens/s | vs plain HF | % of matmul peak | answers = unbatched HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, seconds, answers in rows:
        same = sum(a == b for a, b in zip(answers, reference)) if reference else None
        print(f"| {label} | {seconds:.1f} | {new_tokens / seconds:.1f} | {t_plain / seconds:.2f}x | "
              f"{100 * useful_flops / seconds / peak:.1f}% | "
              f"{f'{same}/{len(prompts)}' if same is not None else '-'} |")


def bf16_agreement(model_dir, prompts, budget):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    generator = SimpleGenerator(str(model_dir), device="cpu", dtype=torch.bfloat16, track_emissions=False)
    with torch.inference_mode():
        single = hf_unbatched(model, tokenizer, prompts, [budget] * len(prompts))
        batched = generator(prompts, batch_size=16, max_new_tokens=budget, min_new_tokens=budget, temperature=0,
                            skip_prompt=True, show_progress_bar=False)
    same = sum(a == b for a, b in zip(single, batched))
    print(f"\nbf16: {same}/{len(prompts)} greedy answers at batch 16 equal unbatched bf16 generation "
          "(fp32: see the tables above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fixed-new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small model and workload")
    parser.add_argument("--model-dir", default=None, help="reuse/keep the random checkpoint here")
    parser.add_argument("--no-reference", action="store_true", help="skip the unbatched fidelity reference")
    parser.add_argument("--bf16", action="store_true", help="also measure bf16 batched-vs-unbatched agreement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # answer lengths are forced with min_new_tokens above a row's own budget: HF warns about that, harmlessly
    warnings.filterwarnings("ignore", message="Unfeasible length constraints")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = dict(hidden=256, layers=4, heads=4) if args.quick else dict(hidden=args.hidden, layers=args.layers,
                                                                      heads=max(1, args.hidden // 64))
    if args.quick:
        args.prompts = min(args.prompts, 64)
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="sg-bench-"))
    if not (model_dir / "config.json").exists():
        build_tiny_checkpoint(model_dir, "llama", context=1024, init=0.02, **size)

    prompts = make_prompts(args.prompts)
    budgets = long_tailed_budgets(args.prompts)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    params = sum(p.numel() for p in model.parameters())
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    peak = matmul_peak()

    default = SimpleGenerator(str(model_dir), device="cpu", track_emissions=False)
    static = SimpleGenerator(str(model_dir), device="cpu", track_emissions=False, engine="static")
    generators = [("simple-generation static engine", static, {"batch_size": args.batch_size})]
    try:
        continuous = SimpleGenerator(str(model_dir), device="cpu", track_emissions=False, engine="continuous")
        generators.append(("simple-generation continuous engine (64 slots)", continuous, {}))
    except (ValueError, ImportError) as err:
        print(f"(no continuous engine: {err})")
    generators.append((f"simple-generation default (engine {default.engine_name}, batch auto)", default, {}))
    # warm-up of every path, so none pays first-call costs inside its timing
    warm = prompts[:4]
    for _, generator, kwargs in generators:
        ours(generator, warm, [2] * 4, **kwargs)
    hf_batches(model, tokenizer, warm, [2] * 4, 4, list(range(4)))

    print(f"model: random Llama, {params / 1e6:.0f}M parameters, fp32, {torch.get_num_threads()} CPU threads; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (fp32, 1024x1024)")
    print(f"prompts: {min(prompt_tokens)}-{max(prompt_tokens)} tokens (mean "
          f"{sum(prompt_tokens) / len(prompt_tokens):.0f})")
    with torch.inference_mode():
        reference = None if args.no_reference else hf_unbatched(model, tokenizer, prompts, budgets)
    run_workload("varied-length answers", prompts, budgets, model, tokenizer, generators, args.batch_size, peak,
                 params, prompt_tokens, reference)
    fixed = [args.fixed_new_tokens] * len(prompts)
    with torch.inference_mode():
        reference = None if args.no_reference else hf_unbatched(model, tokenizer, prompts, fixed)
    run_workload("fixed-length answers", prompts, fixed, model, tokenizer, generators, args.batch_size, peak,
                 params, prompt_tokens, reference)
    if args.bf16:
        bf16_agreement(model_dir, prompts[:48], 32)


if __name__ == "__main__":
    main()
