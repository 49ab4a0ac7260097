"""Prefix caching in the continuous engine: shared prompt beginnings are computed once, answers never change.

Every answer with the cache on equals the answer with it off and HF's unbatched ``model.generate`` for
that prompt, token for token (greedy fp32 on tiny random models whose logits are well separated; seeded
sampling through the static engine's sampler), on every architecture the continuous engine supports.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from simple_generation import SimpleGenerator
from simple_generation.engines.continuous import ContinuousEngine
from simple_generation.engines.prefix_cache import BLOCK_SIZE, PrefixCache, block_hashes, shared_blocks
from simple_generation.requests import GenerationParams, Request
from simple_generation.sampling import SeededSampler, greedy_config

from .reference import load_reference
from .test_continuous import _tiny_causal, trim, unbatched


def shared_prompts(vocab: int, count: int = 12, seed: int = 0) -> list[list[int]]:
    """A common system message, then one of two few-shot blocks, then a question of 1-19 tokens; plus a
    prompt that is only part of the system message and one that stops inside a few-shot block."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    system, first, second = words(37), words(70), words(45)
    prompts = [system + (first if i % 2 else second) + words(rng.randrange(1, 20)) for i in range(count)]
    return prompts + [system[:20], system + first[:11]]


def greedy_params(eos) -> GenerationParams:
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=0)
    return GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")


def answers(engine, prompts, params, budget=10, seeds=None):
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=budget,
                        seed=None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
    outputs = {r.id: o for r, o in engine.run(requests)}
    assert sorted(outputs) == list(range(len(prompts)))
    return {i: o.sequences for i, o in outputs.items()}


# ---------------------------------------------------------------------------------------------- the cache itself
def test_blocks_are_matched_by_their_tokens_and_their_whole_beginning():
    layers = [(torch.randn(3, 2, 40, 4), torch.randn(3, 2, 40, 8))]   # keys and values of different widths
    cache = PrefixCache(budget_bytes=1 << 20)
    prompt = list(range(100, 140))                                     # 2 full blocks and 8 tokens
    assert cache.match(prompt) == []
    assert cache.store(prompt, [], set(block_hashes(prompt)), layers, row=1, first_column=0) == 2
    path = cache.match(prompt)
    assert [node.tokens for node in path] == [tuple(prompt[:16]), tuple(prompt[16:32])]
    keys, values = next(cache.gather([path, path[:1], []], 2))
    assert torch.equal(keys[0], layers[0][0][1, :, :32]) and torch.equal(values[0], layers[0][1][1, :, :32])
    assert torch.equal(keys[1, :, 16:], layers[0][0][1, :, :16]) and not keys[1, :, :16].any()  # right-aligned
    assert not keys[2].any()
    # the same second block after another first block is another prefix; a prompt of exactly two blocks
    # keeps one token to compute, so it matches one block
    assert cache.match([0] * 16 + prompt[16:40]) == []
    assert len(cache.match(prompt[:32])) == 1


def test_only_blocks_two_prompts_begin_with_are_worth_keeping():
    a, b, c = list(range(40)), list(range(32)) + [99] * 8, [7] * 40
    shared = shared_blocks([a, b, c])
    assert shared == set(block_hashes(a)[:2])
    layers = [(torch.randn(1, 1, 40, 2), torch.randn(1, 1, 40, 2))]
    cache = PrefixCache(budget_bytes=1 << 20)
    assert cache.store(c, [], shared, layers, row=0, first_column=0) == 0


def test_a_full_budget_evicts_the_least_recently_used_blocks_nothing_extends():
    layers = [(torch.randn(1, 1, 64, 2), torch.randn(1, 1, 64, 2))]
    block_bytes = 2 * BLOCK_SIZE * 2 * 4
    cache = PrefixCache(budget_bytes=4 * block_bytes)   # slot 0 is the zero block: room for 3
    first = list(range(64))
    second = first[:16] + list(range(1000, 1048))       # shares first's first block only
    assert cache.store(first, [], set(block_hashes(first)), layers, 0, 0) == 3   # the 4th does not fit
    path = cache.match(second)
    assert len(path) == 1
    # first's 3rd block, then its 2nd (a leaf once the 3rd is gone) make room; the shared 1st stays
    assert cache.store(second, path, set(block_hashes(second)), layers, 0, 16) == 2
    assert len(cache.match(first)) == 1 and len(cache.match(second)) == 3 and cache.nodes == 3
    assert PrefixCache(budget_bytes=block_bytes).store(first, [], set(block_hashes(first)), layers, 0, 0) == 0


# ---------------------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("arch", ["qwen2", "opt", "gpt_neox"] + [
    pytest.param(arch, marks=pytest.mark.slow) for arch in
    ("mistral", "phi", "gemma", "falcon", "gptj", "gpt_bigcode", "qwen3", "phi3", "llama3_rope", "gemma2")])
def test_greedy_with_the_cache_equals_without_it_and_unbatched(arch):
    model = _tiny_causal(arch)
    prompts = shared_prompts(model.config.vocab_size)
    params = greedy_params([2])
    on = ContinuousEngine(model, None, max_slots=4)
    off = ContinuousEngine(model, None, max_slots=4, prefix_cache=False)
    cached, plain = answers(on, prompts, params), answers(off, prompts, params)
    for i, prompt in enumerate(prompts):
        expected = trim(unbatched(model, prompt, params.config, 10)[0], {2}, None)
        assert cached[i] == plain[i] == [expected], (arch, i)
    assert on.stats.prefix_caching and not off.stats.prefix_caching
    assert on.stats.prompt_tokens == off.stats.prompt_tokens == sum(map(len, prompts))
    assert off.stats.prefix_cached_tokens == 0
    # each few-shot group's first prompt computes the group's blocks; the other five reuse them all
    system_and_first, system_and_second = (37 + 70) // BLOCK_SIZE, (37 + 45) // BLOCK_SIZE
    assert on.stats.prefix_cached_tokens >= 5 * BLOCK_SIZE * (system_and_first + system_and_second)
    assert on.stats.forward_passes <= off.stats.forward_passes + 2   # grouping costs at most a chunk or two


def test_a_tiny_budget_evicts_and_answers_stay_the_same(llama):
    model, _ = llama
    prompts = shared_prompts(model.config.vocab_size, count=16, seed=1)
    params = greedy_params(None)
    probe = ContinuousEngine(model, None, prefix_cache_memory_bytes=1 << 30)
    answers(probe, prompts[:2], params, budget=1)
    block_bytes = probe._prefixes.block_bytes or 1
    tiny = ContinuousEngine(model, None, max_slots=3, prefix_cache_memory_bytes=4 * block_bytes)
    off = ContinuousEngine(model, None, max_slots=3, prefix_cache=False)
    assert answers(tiny, prompts, params) == answers(off, prompts, params)
    assert tiny._prefixes.nodes <= 3
    assert 0 < tiny.stats.prefix_cached_tokens


def test_seeded_sampling_and_per_prompt_parameters_are_unchanged(llama):
    model, tokenizer = llama
    prompts = shared_prompts(model.config.vocab_size, count=8, seed=2)
    sample = GenerationConfig(do_sample=True, temperature=0.9, num_return_sequences=2, eos_token_id=None)
    penalty = GenerationConfig(do_sample=False, repetition_penalty=1.5, eos_token_id=None)
    params = [GenerationParams(config=c, call_kwargs={}, stop_strings=(), seed=5, fingerprint=str(i))
              for i, c in enumerate((sample, penalty))]

    def run(engine):
        requests = [Request(id=i, token_ids=p, params=params[i % 2], max_new_tokens=6 + i % 3, seed=i)
                    for i, p in enumerate(prompts)]
        return {r.id: o.sequences for r, o in engine.run(requests)}

    on = ContinuousEngine(model, tokenizer, max_slots=3)
    cached = run(on)
    assert cached == run(ContinuousEngine(model, tokenizer, max_slots=3, prefix_cache=False))
    assert on.stats.prefix_cached_tokens > 0
    for i in (0, 1):  # against HF's own generate with the static engine's seeded sampler
        prompt = prompts[i]
        if i % 2 == 0:
            single = greedy_config(sample)
            single.num_return_sequences = 1
            expected = [unbatched(model, prompt, single, 6 + i % 3, logits_processor=LogitsProcessorList(
                [SeededSampler(sample, [(i, j)])]))[0] for j in range(2)]
        else:
            expected = unbatched(model, prompt, penalty, 6 + i % 3)
        assert cached[i] == expected, i


@pytest.mark.slow
def test_lora_with_the_cache_equals_unbatched(llama):
    peft = pytest.importorskip("peft")
    model, tokenizer = llama
    torch.manual_seed(0)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts = shared_prompts(model.config.vocab_size, count=6, seed=3)
    params = greedy_params(None)
    engine = ContinuousEngine(lora, tokenizer, max_slots=2)
    got = answers(engine, prompts, params, budget=6)
    assert engine.stats.prefix_cached_tokens > 0
    for i, prompt in enumerate(prompts):
        assert got[i] == unbatched(lora, prompt, params.config, 6), i


def test_a_later_call_reuses_what_an_earlier_one_kept(llama):
    model, _ = llama
    prompts = shared_prompts(model.config.vocab_size, count=6, seed=4)
    engine = ContinuousEngine(model, None, max_slots=4)
    params = greedy_params(None)
    first = answers(engine, prompts[:4], params)
    before = engine.stats.prefix_cached_tokens
    engine.stats.prefix_cached_tokens = 0
    second = answers(engine, prompts[:4], params)
    assert first == second
    assert engine.stats.prefix_cached_tokens > before   # the group leaders' blocks are cached this time


@pytest.fixture(scope="module")
def llama(llama_path):
    return load_reference(llama_path)


# ---------------------------------------------------------------------------------------------- through the API
def test_last_run_reports_hits_and_answers_equal_the_cache_off(llama_path):
    system = ("You are a careful assistant. Answer in one short sentence, and say when you do not know. "
              "Examples follow. ") * 3
    prompts = [f"{system}Question {i}: what is {i} plus {i + 1}?" for i in range(6)]
    on = SimpleGenerator(llama_path, track_emissions=False)
    off = SimpleGenerator(llama_path, track_emissions=False, prefix_cache=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, skip_prompt=True, show_progress_bar=False)
    assert on(prompts, **kwargs) == off(prompts, **kwargs)
    assert on.last_run.engine == "continuous" and on.last_run.prefix_caching is True
    assert 0.5 < on.last_run.prefix_cache_hit_rate < 1
    assert off.last_run.prefix_caching is False and off.last_run.prefix_cache_hit_rate == 0
