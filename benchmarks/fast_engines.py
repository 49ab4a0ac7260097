"""Fast engines against plain HF batching, on the same token ids: raw engine API vs our engine class.

Run inside an engine's environment (``bash scripts/engine-env.sh openvino|vllm``), e.g.:

    .venv-openvino/bin/python benchmarks/fast_engines.py --engine openvino --threads 1
    .venv-vllm/bin/python benchmarks/fast_engines.py --engine vllm --threads 1 --dtype bfloat16

It builds (or reuses) a ~85M-parameter random Llama, formats nothing (prompts are tokenized as they are),
times: plain HF batched greedy ``generate`` (one batch, left padding), the engine's raw API, and our engine
class over it; counts answers equal to HF's unbatched greedy ``generate``; prints one JSON line per
measure and a table. Start-up (export/compile/load) is timed apart from generation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def build_model(path: Path) -> str:
    from simple_generation.tiny import build_tiny_checkpoint

    if not (path / "config.json").is_file():
        build_tiny_checkpoint(path, "llama", hidden=768, layers=12, heads=12, context=512, vocab_size=600, init=0.02)
    return str(path)


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.prompts import PROMPTS

    return [tokenizer(f"{PROMPTS[i % len(PROMPTS)]} #{i}")["input_ids"] for i in range(count)]


def trim(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else list(ids)


def hf_runs(path, prompts, new_tokens, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    eos = model.config.eos_token_id
    pad = eos
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    batched_seconds = time.perf_counter() - started
    batched = [trim(row[width:].tolist(), eos) for row in out]
    unbatched = []
    with torch.inference_mode():
        for p in prompts:
            row = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            unbatched.append(trim(row[0, len(p):].tolist(), eos))
    return batched_seconds, batched, unbatched, eos


def engine_runs(name, path, prompts, new_tokens, dtype, threads, engine_kwargs):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from simple_generation.engines import engine_class
    from simple_generation.engines.base import EngineContext
    from simple_generation.requests import GenerationParams, Request

    context = EngineContext(model_name_or_path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                            config=AutoConfig.from_pretrained(path), is_encoder_decoder=False,
                            model_kwargs={"dtype": dtype}, engine_kwargs=engine_kwargs)
    started = time.perf_counter()
    engine = engine_class(name).create(context)
    startup = time.perf_counter() - started
    eos = context.config.eos_token_id
    params = GenerationParams(config=GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos),
                              call_kwargs={}, stop_strings=(), seed=None, fingerprint="bench")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=new_tokens) for i, p in enumerate(prompts)]

    def ours():
        found = {}
        for request, output in engine.run(requests):
            found[request.id] = trim(output.sequences[0], eos)
        return [found[i] for i in range(len(prompts))]

    if name == "openvino":
        import numpy as np
        import openvino
        import openvino_genai

        def raw():
            configs = []
            for _ in prompts:
                config = openvino_genai.GenerationConfig()
                config.max_new_tokens, config.do_sample, config.eos_token_id = new_tokens, False, eos
                configs.append(config)
            results = engine.pipeline.generate([openvino.Tensor(np.asarray([p], dtype=np.int64)) for p in prompts],
                                               configs)
            return [trim(list(r.m_generation_ids[0]), eos) for r in results]
    else:
        from vllm import SamplingParams

        def raw():
            results = engine.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                          SamplingParams(max_tokens=new_tokens, temperature=0, stop_token_ids=[eos],
                                                         detokenize=False), use_tqdm=False)
            return [trim(list(r.outputs[0].token_ids), eos) for r in results]

    timings = {}
    answers = {}
    for label, fn in (("raw", raw), ("ours", ours), ("raw2", raw), ("ours2", ours)):  # warm, then measure again
        started = time.perf_counter()
        answers[label] = fn()
        timings[label] = time.perf_counter() - started
    return startup, timings, answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["openvino", "vllm"], required=True)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: build ~85M Llama in .bench/)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--engine-kwargs", default="{}", help='JSON, e.g. {"inference_precision": "bf16"}')
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[1] / ".bench"
    path = args.model or build_model(root / "llama-85m")
    engine_kwargs = json.loads(args.engine_kwargs)
    if args.engine == "openvino":
        engine_kwargs.setdefault("num_threads", args.threads)
        engine_kwargs.setdefault("ov_cache_dir", str(root / "openvino"))
    else:
        engine_kwargs.setdefault("max_model_len", 512)
    prompts = make_prompts(AutoTokenizer.from_pretrained(path), args.prompts)

    hf_seconds, hf_batched, hf_unbatched, _ = hf_runs(path, prompts, args.new_tokens, "float32")
    startup, timings, answers = engine_runs(args.engine, path, prompts, args.new_tokens, args.dtype, args.threads,
                                            engine_kwargs)
    raw_s, ours_s = min(timings["raw"], timings["raw2"]), min(timings["ours"], timings["ours2"])
    same = lambda xs: sum(a == b for a, b in zip(xs, hf_unbatched))  # noqa: E731
    rows = [
        ("HF batched fp32 (1 batch)", hf_seconds, same(hf_batched)),
        (f"raw {args.engine} ({args.dtype})", raw_s, same(answers["raw2"])),
        (f"ours: engine={args.engine} ({args.dtype})", ours_s, same(answers["ours2"])),
    ]
    tokens = args.prompts * args.new_tokens
    print(json.dumps({"engine": args.engine, "dtype": args.dtype, "threads": args.threads, "prompts": args.prompts,
                      "new_tokens": args.new_tokens, "startup_s": round(startup, 2), "hf_s": round(hf_seconds, 3),
                      "raw_s": round(raw_s, 3), "ours_s": round(ours_s, 3),
                      "overhead_vs_raw": round(ours_s / raw_s - 1, 4), "engine_kwargs": engine_kwargs,
                      "ours_equal_raw": answers["ours2"] == answers["raw2"]}))
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens, {args.threads} thread(s); "
          f"engine start-up {startup:.1f} s (not in the times)")
    print(f"{'run':<34} {'seconds':>8} {'tok/s':>8} {'speed-up':>9} {'= HF unbatched':>15}")
    for label, seconds, equal in rows:
        print(f"{label:<34} {seconds:>8.2f} {tokens / seconds:>8.0f} {hf_seconds / seconds:>8.2f}x "
              f"{equal:>9}/{args.prompts}")


if __name__ == "__main__":
    main()
