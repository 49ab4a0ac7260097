"""Throughput of SimpleGenerator against plain HF batching and a one-prompt-at-a-time loop.

Builds a ~100M-parameter random Llama locally (no download), then runs one fixed workload three ways
in the same process: mixed-length prompts, greedy, every answer forced to exactly ``--max-new-tokens``
tokens (``min_new_tokens``), so the three do identical work. Reports wall time, generated tokens/s and
ratios, plus how many of our answers equal the unbatched loop's (fidelity).

    python benchmarks/throughput.py                 # full run (~100M params, 128 prompts)
    python benchmarks/throughput.py --quick         # a smaller model, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
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
    # Log-uniform lengths: many short prompts, a few long ones, as in real evaluation sets.
    lengths = [int(round(min_words * (max_words / min_words) ** rng.random())) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def naive_loop(model, tokenizer, prompts, max_new):
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def hf_batched(model, tokenizer, prompts, max_new, batch_size):
    """What most scripts do: fixed-size batches in input order, padded to the longest of each batch."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="small model and workload")
    parser.add_argument("--model-dir", default=None, help="reuse/keep the random checkpoint here")
    parser.add_argument("--skip-naive", action="store_true", help="skip the slow one-at-a-time loop")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)

    size = dict(hidden=256, layers=4, heads=4) if args.quick else dict(hidden=768, layers=14, heads=12)
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 48), min(args.max_new_tokens, 16)
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="sg-bench-"))
    if not (model_dir / "config.json").exists():
        build_tiny_checkpoint(model_dir, "llama", context=1024, init=0.02, **size)

    prompts = make_prompts(args.prompts)
    n_new = args.prompts * args.max_new_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    params = sum(p.numel() for p in model.parameters())
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]

    generator = SimpleGenerator(str(model_dir), device="cpu", track_emissions=False)
    # Warm-up of every path on a slice, so no method pays first-call costs inside its timing.
    warm = prompts[: args.batch_size]
    generator(warm, batch_size=args.batch_size, max_new_tokens=2, show_progress_bar=False)
    hf_batched(model, tokenizer, warm, 2, args.batch_size)
    naive_loop(model, tokenizer, warm[:2], 2)
    with torch.inference_mode():
        ours, t_ours = timed(lambda: generator(
            prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens, temperature=0, skip_prompt=True, show_progress_bar=False))
        _, t_hf = timed(lambda: hf_batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size))
        if not args.skip_naive:
            naive, t_naive = timed(lambda: naive_loop(model, tokenizer, prompts, args.max_new_tokens))

    rows = [("simple-generation (sorted batches)", t_ours), (f"HF generate, batches of {args.batch_size}", t_hf)]
    if not args.skip_naive:
        rows.append(("HF generate, one prompt at a time", t_naive))
    print(f"\nmodel: random Llama, {params / 1e6:.0f}M parameters, fp32, {torch.get_num_threads()} CPU threads "
          f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})")
    print(f"workload: {args.prompts} prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens "
          f"(mean {sum(prompt_tokens) / len(prompt_tokens):.0f}), {args.max_new_tokens} new tokens each, greedy, "
          f"batch size {args.batch_size}\n")
    print("| method | wall time (s) | generated tokens/s | simple-generation speed-up |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {n_new / seconds:.1f} | {seconds / t_ours:.2f}x |")
    if not args.skip_naive:
        same = sum(a == b for a, b in zip(ours, naive))
        print(f"\nfidelity: {same}/{len(prompts)} simple-generation answers equal the unbatched loop's")


if __name__ == "__main__":
    main()
