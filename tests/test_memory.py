"""Memory is part of the contract: no autograd in any engine, memory bounded by the KV cache over hundreds of
steps (measured in a subprocess), the continuous engine's cache budget, and ``last_run``'s peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from simple_generation import SimpleGenerator
from simple_generation.engines.continuous import ContinuousEngine
from simple_generation.memory import kv_bytes_per_token
from simple_generation.requests import GenerationParams, Request
from simple_generation.tiny import build_tiny_checkpoint

from .engine_helpers import make_params, run_all
from .prompts import PROMPTS
from .reference import load_reference
from .test_continuous import random_prompts, unbatched


@pytest.fixture(scope="module")
def llama(llama_path):
    return load_reference(llama_path)


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_no_engine_records_autograd(llama_path, engine):
    gen = SimpleGenerator(llama_path, engine=engine, track_emissions=False)
    assert all(p.requires_grad for p in gen.model.parameters())  # as from_pretrained leaves them
    seen = []

    def inspect(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        tensors = [output.logits] + [t for layer in getattr(cache, "layers", [])
                                     for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                                     if isinstance(t, torch.Tensor)]
        seen.append((torch.is_grad_enabled(), any(t.requires_grad or t.grad_fn is not None for t in tensors)))

    handle = gen.model.register_forward_hook(inspect, with_kwargs=True)
    try:
        gen(PROMPTS[:6], max_new_tokens=6, temperature=0, batch_size=2, show_progress_bar=False)
        gen(PROMPTS[:3], max_new_tokens=4, temperature=0.8, seed=1, n=2, show_progress_bar=False)
    finally:
        handle.remove()
    assert gen.last_run.engine == engine
    assert seen and not any(grad for grad, _ in seen), "a forward pass ran with autograd on"
    assert not any(tracked for _, tracked in seen), "a cache tensor or output requires grad"


LONG_RUN = textwrap.dedent("""
    import json, sys
    from simple_generation import SimpleGenerator
    path, engine = sys.argv[1], sys.argv[2]
    gen = SimpleGenerator(path, engine=engine, track_emissions=False)
    prompts = ["tell me about the sea " * (1 + i) for i in range(8)]
    gen(prompts, max_new_tokens=2, temperature=0, show_progress_bar=False)      # warm-up
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    results = gen.generate(prompts, max_new_tokens=320, temperature=0, show_progress_bar=False)
    print(json.dumps({"before_mb": rss, "peak_mb": gen.last_run.peak_rss_mb,
                      "tokens": [r.completion_tokens for r in results],
                      "prompt_tokens": [r.prompt_tokens for r in results]}))
""")


@pytest.fixture(scope="module")
def no_eos_llama(tmp_path_factory):
    """A checkpoint whose generation config has no EOS: every answer runs its whole budget."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("no-eos") / "llama", "llama", hidden=256, layers=4, heads=4,
                                 context=1024, init=0.02)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = None
    config_file.write_text(json.dumps(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_memory_over_hundreds_of_steps_stays_near_the_kv_cache(no_eos_llama, engine):
    out = subprocess.run([sys.executable, "-c", LONG_RUN, str(no_eos_llama), engine], capture_output=True,
                         text=True, timeout=600, check=True)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["tokens"] == [320] * 8  # hundreds of decoding steps for every row
    config = LlamaConfig.from_pretrained(no_eos_llama)
    kv_mb = kv_bytes_per_token(config, 4) * sum(p + 320 for p in run["prompt_tokens"]) / 2**20
    # the cache (~11 MB here), a copy of it while it grows, activations and allocator slack; a recorded
    # autograd graph keeps every step's cache alive (> 1 GB at this length)
    assert run["peak_mb"] - run["before_mb"] < 4 * kv_mb + 80, run


def test_last_run_reports_peak_memory(llama_path):
    gen = SimpleGenerator(llama_path, track_emissions=False)
    gen(PROMPTS[:2], max_new_tokens=3, temperature=0, show_progress_bar=False)
    assert gen.last_run.peak_rss_mb is not None and gen.last_run.peak_rss_mb > 50
    assert gen.last_run.peak_cuda_mb is None or not torch.cuda.is_available()


def test_cache_budget_bounds_the_rows_and_keeps_answers(llama):
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 12, seed=3)
    params = make_params(do_sample=False, eos_token_id=None)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    token_bytes = kv_bytes_per_token(model.config, 4)
    budget = 3 * (150 + 24) * token_bytes   # room for about three of the widest rows
    engine = ContinuousEngine(model, tokenizer, max_slots=12, kv_cache_memory_bytes=budget)
    outputs = run_all(engine, requests)
    assert 0 < engine.stats.peak_cache_bytes <= budget
    assert 1 <= engine.stats.peak_rows < 6
    for request in requests:
        assert outputs[request.id].sequences == [
            unbatched(model, request.token_ids, GenerationConfig(do_sample=False, eos_token_id=None),
                      request.max_new_tokens)[0]]
    wide = ContinuousEngine(model, tokenizer, max_slots=12)
    run_all(wide, requests)
    assert wide.stats.peak_rows > engine.stats.peak_rows and wide.stats.peak_cache_bytes > budget


def test_one_request_runs_even_over_the_budget(llama):
    model, tokenizer = llama
    params = make_params(do_sample=False, eos_token_id=None)
    request = Request(id=0, token_ids=list(range(5, 60)), params=params, max_new_tokens=5)
    engine = ContinuousEngine(model, tokenizer, kv_cache_memory_bytes=1)
    assert run_all(engine, [request])[0].sequences == [
        unbatched(model, request.token_ids, GenerationConfig(do_sample=False, eos_token_id=None), 5)[0]]


@pytest.mark.parametrize("bad", [{"kv_cache_memory_bytes": 0}, {"kv_cache_memory_bytes": 1.5},
                                 {"kv_cache_memory_fraction": 0}, {"kv_cache_memory_fraction": 2}])
def test_bad_budget_is_refused(llama, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ContinuousEngine(llama[0], llama[1], **bad)


@pytest.mark.slow
def test_smollm_135m_shape_greedy_equals_unbatched():
    """The continuous engine at a shape people run (SmolLM-135M's config, random weights, real init)."""
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts, budgets = random_prompts(config.vocab_size, 10, seed=5)
    generation = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=2)
    params = GenerationParams(config=generation, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    engine = ContinuousEngine(model, None, max_slots=4)
    outputs = run_all(engine, requests)
    for request in requests:
        expected = unbatched(model, request.token_ids, generation, request.max_new_tokens)[0]
        assert outputs[request.id].sequences == [expected], request.id


def test_engine_options_reach_the_continuous_engine_under_auto(llama_path):
    gen = SimpleGenerator(llama_path, kv_cache_memory_bytes=10**6, max_slots=4, track_emissions=False)
    answers = gen(PROMPTS[:3], max_new_tokens=4, temperature=0, show_progress_bar=False)
    assert gen.last_run.engine == "continuous"
    engine = gen.router.engine("continuous")
    assert (engine.kv_cache_memory_bytes, engine.max_slots) == (10**6, 4)
    static = SimpleGenerator(llama_path, engine="static", track_emissions=False)
    assert answers == static(PROMPTS[:3], max_new_tokens=4, temperature=0, show_progress_bar=False)
