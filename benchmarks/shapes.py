"""Time and peak memory of every engine at the shapes people run on CPUs, against plain HF batching.

Builds random checkpoints with the real configs of SmolLM-135M, SmolLM-360M (Llama), Qwen2.5-0.5B
(Qwen2) and GPT-2 small (real vocabulary sizes; a byte-level BPE trained locally and padded with
added tokens to the model's vocabulary; no EOS in ``generation_config.json``, so every answer runs to
its budget, which is what natural stops cost). Each (model, workload, method) runs in its own process,
so its peak RSS is its own. Workloads:

* ``fixed``: 48 prompts of 3-160 words (log-uniform), 32 new tokens each;
* ``varied``: 200 such prompts with long-tailed budgets of 4-128 new tokens (per-prompt ``max_new_tokens``;
  plain HF runs each batch to its longest budget);
* ``prefix``: 128 prompts that all begin with one ~512-token few-shot block, then a 10-30-word question
  each; 16 new tokens (run ``default`` and ``default:prefix_cache=false`` to see the prefix cache's
  share). The "% matmul peak" column counts the work plain HF does (every prompt token), so a cache
  that skips work can pass 100%.

When a method's answers differ from plain HF's, the first differing answer is explained: the step where
it differs and plain HF's two top logits there (a tie within 1e-5 is a legitimate difference; anything
wider is a bug).

Methods: ``hf`` (plain ``model.generate``, batches of 16 in input order), ``static``, ``continuous``,
``default`` (``SimpleGenerator(path)``, nothing named), and ``openvino`` / ``vllm`` when their venvs
exist (``scripts/engine-env.sh``); ``ENGINE:key=value,...`` passes engine keywords (values as JSON), e.g.
``continuous:max_slots=32`` or ``openvino:max_num_batched_tokens=2048``. For each: wall time of the call
(after a warm-up), speed-up over ``hf`` in the same run, peak RSS during the call (the process tree,
sampled every 5 ms) and after loading, the fraction of this machine's fp32 matmul peak the useful work
reaches (2 x parameters per prompt and answer token), and how many answers equal plain HF's token for
token.

    python benchmarks/shapes.py                                   # SmolLM-135M shape, both workloads
    python benchmarks/shapes.py --models smollm-135m smollm-360m qwen2.5-0.5b gpt2 --threads 2
    python benchmarks/shapes.py --methods hf static continuous --workloads fixed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "smollm-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)),
    "smollm-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                  num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                  max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
                                   use_sliding_window=False, sliding_window=None)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
}
WORDS = ("the quick brown fox jumps over lazy dog write poem style sea sky mountains dawn tell me what is two "
         "plus translate sentence spanish library runs text generation model prompts researchers evaluate "
         "engineers data training once upon time small learned answer questions").split()
HF_BATCH = 16


def make_prompts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 160) -> list[str]:
    rng = random.Random(seed)
    lengths = [int(round(min_words * (max_words / min_words) ** rng.random())) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def workload(name: str) -> tuple[list[str], list[int]]:
    if name == "fixed":
        return make_prompts(48), [32] * 48
    if name == "prefix":
        rng = random.Random(2)
        block = " ".join(rng.choice(WORDS) for _ in range(510))
        return [f"{block} {question}" for question in make_prompts(128, seed=3, min_words=10, max_words=30)], [16] * 128
    rng = random.Random(1)
    return make_prompts(200), [int(round(4 * 32 ** (rng.random() ** 2))) for _ in range(200)]


# ---------------------------------------------------------------------------------------------- building
def build(name: str, path: Path) -> Path:
    """A random checkpoint with ``name``'s config at ``path`` (kept: built once per cache folder)."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    arch, fields = MODELS[name]
    vocab = fields["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(500)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(vocab - tok.get_vocab_size())])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = AutoConfig.for_model(arch, **fields, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None   # every answer runs to its budget
    model.generation_config.pad_token_id = 2
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- measuring
def _tree_rss(root: int | None = None) -> int:
    """Resident bytes of process ``root`` (default: this one) and its descendants (engines may run helper
    processes)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
            parents[int(entry)] = int(stat[1])
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


class PeakRSS:
    """Samples the process tree's RSS in a thread while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self._stop = _tree_rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _tree_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss())


def worker(model_dir: str, method: str, work: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    prompts, budgets = workload(work)
    if method == "hf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")

        def run(texts, lengths):
            answers = []
            with torch.inference_mode():
                for start in range(0, len(texts), HF_BATCH):
                    chunk = slice(start, start + HF_BATCH)
                    inputs = tokenizer(texts[chunk], return_tensors="pt", padding=True)
                    out = model.generate(**inputs, max_new_tokens=max(lengths[chunk]), do_sample=False)
                    new = out[:, inputs["input_ids"].shape[1]:].tolist()
                    answers.extend(row[:b] for row, b in zip(new, lengths[chunk]))
            return answers, "hf"
        params = sum(p.numel() for p in model.parameters())
        prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    else:
        from simple_generation import SimpleGenerator

        name, _, options = method.partition(":")
        kwargs = {} if name == "default" else {"engine": name}
        for option in filter(None, options.split(",")):   # e.g. openvino:max_num_batched_tokens=2048
            key, value = option.split("=", 1)
            kwargs[key] = json.loads(value)
        gen = SimpleGenerator(model_dir, device="cpu", track_emissions=False, **kwargs)

        def run(texts, lengths):
            results = gen.generate(texts, params=[{"max_new_tokens": b} for b in lengths],
                                   max_new_tokens=max(lengths), temperature=0, skip_prompt=True,
                                   show_progress_bar=False, dedup=False)
            return [r.token_ids[0] if r.token_ids else [] for r in results], gen.last_run.engine
        params = sum(p.numel() for p in gen.model.parameters()) if gen.model is not None else None
        prompt_tokens = sum(len(gen.tokenizer(p)["input_ids"]) for p in prompts)
    loaded = _tree_rss()
    # warm-up: first-call costs stay out of the timing (reversed prompts: no prefix of the real ones cached)
    run([" ".join(p.split()[::-1]) for p in prompts[:4]], [2] * 4)
    with PeakRSS() as rss:
        start = time.perf_counter()
        answers, engine = run(prompts, budgets)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "loaded_mb": loaded / 2**20, "peak_mb": rss.peak / 2**20, "answers": answers,
            "engine": engine, "params": params, "prompt_tokens": prompt_tokens, "new_tokens": sum(budgets)}


def explain_difference(model_dir, work: str, method: str, answers, reference) -> None:
    """Print where ``method``'s first answer that differs from plain HF's departs, with HF's two top
    logits at that step (their gap says whether it is a tie)."""
    first = next((i for i, (a, b) in enumerate(zip(answers, reference)) if a != b), None)
    if first is None:
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = next((k for k, (a, b) in enumerate(zip(answers[first], reference[first])) if a != b),
                min(len(answers[first]), len(reference[first])))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer(workload(work)[0][first])["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + reference[first][:step]])).logits[0, -1].float()
    top = logits.topk(2)
    print(f"  {method}: answer {first} differs at step {step}: plain HF's top logits {top.values[0]:.6f} "
          f"(token {int(top.indices[0])}) and {top.values[1]:.6f} (token {int(top.indices[1])}), gap "
          f"{float(top.values[0] - top.values[1]):.2e}{' (a tie)' if top.values[0] - top.values[1] <= 1e-5 else ''}")


def matmul_peak(threads: int) -> float:
    """fp32 FLOP/s of a square matmul on ``threads`` threads (see throughput.py)."""
    import torch
    from throughput import matmul_peak as peak

    torch.set_num_threads(threads)
    return peak()


def python_for(method: str) -> str | None:
    method = method.partition(":")[0]
    if method in ("openvino", "vllm"):
        venv = ROOT / f".venv-{method}" / "bin" / "python"
        return str(venv) if venv.exists() else None
    return sys.executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm-135m"], choices=sorted(MODELS))
    parser.add_argument("--workloads", nargs="+", default=["fixed", "varied"], choices=["fixed", "varied", "prefix"])
    parser.add_argument("--methods", nargs="+",
                        default=["hf", "static", "continuous", "default", "openvino", "vllm"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/sg-shapes", help="where the random checkpoints are kept")
    parser.add_argument("--json", help="also write every measurement (without answers) to this file")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL_DIR", "METHOD", "WORKLOAD", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        model_dir, method, work, threads = args.worker
        print("RESULT " + json.dumps(worker(model_dir, method, work, int(threads))))
        return
    peak = matmul_peak(args.threads)
    print(f"{args.threads} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (1024x1024)")
    rows = []
    for name in args.models:
        model_dir = build(name, Path(args.cache_dir) / name)
        for work in args.workloads:
            results = {}
            for method in args.methods:
                python = python_for(method)
                if python is None:
                    print(f"  {method}: no .venv-{method} (scripts/engine-env.sh {method}), skipped")
                    continue
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
                proc = subprocess.run([python, __file__, "--worker", str(model_dir), method, work, str(args.threads)],
                                      capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                    print(f"  {method}: failed ({tail})")
                    continue
                results[method] = json.loads(line[len("RESULT "):])
            base = results.get("hf")
            print(f"\n### {name}, {work}\n")
            print("| method | engine | time (s) | vs plain HF | peak RSS (MB) | loaded (MB) | % matmul peak "
                  "| answers = plain HF |")
            print("|---|---|---:|---:|---:|---:|---:|---:|")
            for method, r in results.items():
                params = r["params"] or (base or {}).get("params")
                flops = 2 * params * (r["prompt_tokens"] + r["new_tokens"]) if params else None
                same = (sum(a == b for a, b in zip(r["answers"], base["answers"])) if base else None)
                speed = base["seconds"] / r["seconds"] if base else float("nan")
                print(f"| {method} | {r['engine']} | {r['seconds']:.1f} | {speed:.2f}x | {r['peak_mb']:.0f} | "
                      f"{r['loaded_mb']:.0f} | {100 * flops / r['seconds'] / peak:.1f}% | "
                      f"{same if same is not None else '-'}/{len(r['answers'])} |" if flops else "")
                rows.append({"model": name, "workload": work, "method": method,
                             **{k: v for k, v in r.items() if k != "answers"}, "vs_hf": speed,
                             "matmul_fraction": flops / r["seconds"] / peak if flops else None,
                             "same_as_hf": same})
            if base:
                for method, r in results.items():
                    explain_difference(model_dir, work, method, r["answers"], base["answers"])
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "matmul_peak": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
