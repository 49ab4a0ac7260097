"""The continuous engine: every answer equals what HF's unbatched ``model.generate`` gives for that prompt.

Refill is always exercised (fewer slots than requests, per-request budgets that differ, EOS ids that
the tiny models actually produce); nothing is mocked but the out-of-memory error.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList

from simple_generation.engines import EngineContext, engine_class
from simple_generation.engines.continuous import ContinuousEngine
from simple_generation.requests import GenerationParams, Request
from simple_generation.sampling import SeededSampler, greedy_config
from simple_generation.scheduling import BatchFailed

from .engine_helpers import make_params
from .prompts import PROMPTS
from .reference import hf_greedy, load_reference


def random_prompts(vocab: int, count: int, seed: int = 0, low: int = 3) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1 to 150 random tokens and budgets of 1 to 24 new tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, 150, *torch.randint(1, 151, (count - 2,), generator=generator).tolist()]
    budgets = torch.randint(1, 25, (count,), generator=generator).tolist()
    prompts = [torch.randint(low, vocab, (n,), generator=generator).tolist() for n in lengths]
    return prompts, budgets


@torch.inference_mode()
def unbatched(model, prompt: list[int], config: GenerationConfig, budget: int, **kwargs) -> list[list[int]]:
    """HF's own answer for one prompt alone: its new tokens, one list per returned sequence."""
    config = GenerationConfig.from_dict({**config.to_dict(), "max_new_tokens": budget})
    inputs = torch.tensor([prompt])
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config, **kwargs)
    return [row[len(prompt):] for row in output.tolist()]


def trim(row: list[int], eos: set[int], pad: int | None) -> list[int]:
    """HF pads a finished row after its EOS: keep up to and including the first EOS."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def frequent_token(model, prompts, budget=16) -> int:
    """A token the model emits often: used as an extra EOS id so that rows really stop early."""
    counts = collections.Counter()
    for prompt in prompts[:6]:
        counts.update(unbatched(model, prompt, GenerationConfig(do_sample=False), budget)[0])
    return counts.most_common(1)[0][0]


def run_engine(model, tokenizer, requests, isolate_errors=False, **knobs):
    engine = ContinuousEngine(model, tokenizer, **knobs)
    results = list(engine.run(requests, isolate_errors=isolate_errors))
    return engine, results


@pytest.fixture(scope="module")
def llama(llama_path):
    return load_reference(llama_path)


@pytest.fixture(scope="module")
def gpt2(gpt2_path):
    return load_reference(gpt2_path)


@pytest.fixture(params=["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # GPT-2's cases: slow tier
def model_and_tokenizer(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_text_equals_hf_greedy_reference(model_and_tokenizer, llama_path, gpt2_path):
    model, tokenizer = model_and_tokenizer
    path = llama_path if model.config.model_type == "llama" else gpt2_path
    budgets = [3, 17, 9, 24, 1, 12, 24, 5, 16, 8, 20, 2]
    params = make_params(do_sample=False, max_new_tokens=24, eos_token_id=model.config.eos_token_id)
    requests = [Request(id=i, token_ids=tokenizer(p)["input_ids"], params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(PROMPTS, budgets))]
    engine, results = run_engine(model, tokenizer, requests, max_slots=3)
    assert sorted(r.id for r, _ in results) == list(range(len(PROMPTS)))
    answers = {r.id: tokenizer.decode(out.sequences[0], skip_special_tokens=True) for r, out in results}
    for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        assert answers[i] == hf_greedy(path, [prompt], budget, (model, tokenizer))[0], i
    assert all(len(out.sequences[0]) <= budgets[r.id] for r, out in results)


def test_greedy_tokens_equal_unbatched_with_eos_and_refill(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts, budgets = random_prompts(model.config.vocab_size, 16)
    eos = [model.config.eos_token_id, frequent_token(model, prompts)]
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    engine, results = run_engine(model, tokenizer, requests, max_slots=4)
    assert len(results) == len(requests)
    stopped = 0
    for request, output in results:
        expected = trim(unbatched(model, request.token_ids, config, request.max_new_tokens)[0], set(eos), None)
        assert output.sequences == [expected], request.id
        assert len(output.sequences[0]) <= request.max_new_tokens
        stopped += output.finish_reasons[0] == "stop"
        assert output.finish_reasons[0] == ("stop" if expected[-1] in eos else "length")
    assert stopped > 0  # some rows really left the batch on EOS
    assert engine.stats.batch_size == 4


def test_completion_order_short_budgets_first(llama):
    model, tokenizer = llama
    prompts, _ = random_prompts(model.config.vocab_size, 6)
    params = make_params(do_sample=False, eos_token_id=None)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, [30, 2, 30, 2, 30, 2]))]
    _, results = run_engine(model, tokenizer, requests, max_slots=6)
    assert {r.id for r, _ in results[:3]} == {1, 3, 5}
    assert [len(o.sequences[0]) for r, o in results] == [2, 2, 2, 30, 30, 30]


def test_per_row_logits_processors_equal_unbatched(llama):
    """Repetition penalty, n-gram blocking, min_new_tokens, bad words: applied to each prompt alone."""
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 8, seed=3)
    eos = [model.config.eos_token_id, frequent_token(model, prompts)]
    config = GenerationConfig(do_sample=False, eos_token_id=eos, repetition_penalty=1.3, no_repeat_ngram_size=3,
                              min_new_tokens=4, bad_words_ids=[[7]], pad_token_id=tokenizer.pad_token_id)
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    _, results = run_engine(model, tokenizer, requests, max_slots=3)
    for request, output in results:
        expected = trim(unbatched(model, request.token_ids, config, request.max_new_tokens)[0], set(eos), None)
        assert output.sequences == [expected], request.id


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("warping", [{"temperature": 0.7},
                                     pytest.param({"top_k": 20, "top_p": 0.9}, marks=pytest.mark.slow)])
def test_seeded_sampling_equals_static_seeded_sampler(model_and_tokenizer, warping):
    model, tokenizer = model_and_tokenizer
    n = 3
    prompts, budgets = random_prompts(model.config.vocab_size, 6, seed=5)
    eos = [model.config.eos_token_id, frequent_token(model, prompts)]
    config = GenerationConfig(do_sample=True, num_return_sequences=n, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, **warping)
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=11, fingerprint="x")
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b, seed=1000 + i)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    _, results = run_engine(model, tokenizer, requests, max_slots=4)  # 4 slots, 3 rows a request: refills
    assert len(results) == len(requests)
    distinct = 0
    for request, output in results:
        # the static engine's sampler, one sequence at a time (greedy decoding + that sequence's noise)
        single = greedy_config(config)
        single.num_return_sequences = 1
        rows = [unbatched(model, request.token_ids, single, request.max_new_tokens,
                          logits_processor=LogitsProcessorList([SeededSampler(config, [(request.seed, j)])]))[0]
                for j in range(n)]
        assert output.sequences == [trim(row, set(eos), None) for row in rows], request.id
        distinct += len({tuple(s) for s in output.sequences}) > 1
    assert distinct > 0  # the n samples really differ


def test_unseeded_sampling_runs_within_budgets(llama):
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 5)
    params = make_params(do_sample=True, top_k=10, num_return_sequences=2, eos_token_id=model.config.eos_token_id)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    _, results = run_engine(model, tokenizer, requests, max_slots=3)
    for request, output in results:
        assert len(output.sequences) == 2
        assert all(0 < len(s) <= request.max_new_tokens for s in output.sequences)


def test_seeded_samples_do_not_depend_on_slots(llama):
    """A request with more rows than slots still runs (alone), and gets the same samples."""
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 4, seed=9)
    params = make_params(do_sample=True, temperature=0.8, num_return_sequences=3, eos_token_id=None)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b, seed=i)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    wide = {r.id: o.sequences for r, o in run_engine(model, tokenizer, requests, max_slots=12)[1]}
    narrow = {r.id: o.sequences for r, o in run_engine(model, tokenizer, requests, max_slots=2)[1]}
    assert wide == narrow and len(wide) == 4


def test_requests_with_different_parameters_share_the_batch(llama):
    """Per-request parameters: greedy, greedy with a penalty and seeded sampling in one run."""
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 6, seed=4)
    configs = [GenerationConfig(do_sample=False, eos_token_id=None),
               GenerationConfig(do_sample=False, eos_token_id=None, repetition_penalty=1.5),
               GenerationConfig(do_sample=True, temperature=0.9, num_return_sequences=2, eos_token_id=None)]
    params = [GenerationParams(config=c, call_kwargs={}, stop_strings=(), seed=5, fingerprint=str(i))
              for i, c in enumerate(configs)]
    requests = [Request(id=i, token_ids=p, params=params[i % 3], max_new_tokens=b, seed=i)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    engine, results = run_engine(model, tokenizer, requests, max_slots=4)
    for request, output in results:
        config = request.params.config
        if config.do_sample:
            single = greedy_config(config)
            single.num_return_sequences = 1
            expected = [unbatched(model, request.token_ids, single, request.max_new_tokens, logits_processor=
                                  LogitsProcessorList([SeededSampler(config, [(request.seed, j)])]))[0]
                        for j in range(2)]
        else:
            expected = unbatched(model, request.token_ids, config, request.max_new_tokens)
        assert output.sequences == expected, request.id


@pytest.mark.slow
def test_lora_adapter_equals_unbatched(llama):
    peft = pytest.importorskip("peft")
    model, tokenizer = llama
    torch.manual_seed(0)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts, budgets = random_prompts(model.config.vocab_size, 5, seed=6)
    config = GenerationConfig(do_sample=False, eos_token_id=None)
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")
    engine = ContinuousEngine(lora, tokenizer, max_slots=2)
    assert engine.unsupported(params) is None
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    for request, output in engine.run(requests):
        assert output.sequences == unbatched(lora, request.token_ids, config, request.max_new_tokens), request.id


# ---------------------------------------------------------------------------------------------- stop strings
def test_stops_early_on_stop_string(gpt2):
    model, tokenizer = gpt2
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    config = GenerationConfig(do_sample=False, eos_token_id=model.config.eos_token_id)
    full = unbatched(model, prompt, config, 24)[0]
    text = tokenizer.decode(full)
    stop = text[len(tokenizer.decode(full[:6])):][:3]  # a piece of the answer after its sixth token
    assert stop.strip()
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(stop,), seed=None, fingerprint="x")
    _, results = run_engine(model, tokenizer, [Request(id=0, token_ids=prompt, params=params, max_new_tokens=24)])
    output = results[0][1]
    assert output.finish_reasons == ["stop_string"]
    got = output.sequences[0]
    assert got == full[:len(got)] and len(got) < len(full)
    assert stop in tokenizer.decode(got)


# ---------------------------------------------------------------------------------------------- fallbacks
def test_unsupported_beam_search_encoder_decoder_and_call_kwargs(llama, t5_path):
    model, tokenizer = llama
    engine = ContinuousEngine(model, tokenizer)
    assert engine.unsupported(make_params(do_sample=False)) is None
    assert "beam" in engine.unsupported(make_params(num_beams=3))
    streamer = GenerationParams(config=GenerationConfig(), call_kwargs={"streamer": object()}, stop_strings=(),
                                seed=None, fingerprint="x")
    assert "streamer" in engine.unsupported(streamer)
    custom = GenerationParams(config=GenerationConfig(), call_kwargs={"logits_processor": LogitsProcessorList()},
                              stop_strings=(), seed=None, fingerprint="x")
    assert "logits_processor" in engine.unsupported(custom)
    assert "guidance" in engine.unsupported(make_params(guidance_scale=2.0))
    with pytest.raises(ValueError, match="beam"):
        list(engine.run([Request(id=0, token_ids=[5, 6], params=make_params(num_beams=2), max_new_tokens=3)]))

    from transformers import AutoModelForSeq2SeqLM

    t5 = AutoModelForSeq2SeqLM.from_pretrained(t5_path)
    context = EngineContext(model_name_or_path=t5_path, tokenizer=AutoTokenizer.from_pretrained(t5_path),
                            config=t5.config, is_encoder_decoder=True, model=t5)
    t5_engine = engine_class("continuous").create(context)
    assert "encoder-decoder" in t5_engine.unsupported(make_params(do_sample=False))


def test_sliding_window_and_hybrid_models_are_unsupported():
    from transformers import MistralConfig, MistralForCausalLM

    tiny = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    windowed = MistralForCausalLM(MistralConfig(sliding_window=16, **tiny))
    assert "sliding" in ContinuousEngine(windowed, None).unsupported(make_params())
    full = MistralForCausalLM(MistralConfig(sliding_window=None, **tiny))
    assert ContinuousEngine(full, None).unsupported(make_params()) is None


def test_create_takes_its_knobs_from_the_context(llama, llama_path):
    model, tokenizer = llama
    cls = engine_class("continuous")
    assert cls.accepts_kwarg("max_slots") and not cls.accepts_kwarg("batch_size")
    assert cls.available() is None and cls.needs_hf_model
    context = EngineContext(model_name_or_path=llama_path, tokenizer=tokenizer, config=model.config,
                            is_encoder_decoder=False, model=model, engine_kwargs={"max_slots": 7})
    assert cls.create(context).max_slots == 7


# ---------------------------------------------------------------------------------------------- failures
class OOMOnce:
    """A forward pre-hook: raises OutOfMemoryError the first time a decoding step runs ``rows`` rows or more
    (after ``after`` decoding steps). It also records every prefilled prompt, to count how often each
    request was computed.
    """

    def __init__(self, rows: int, after: int = 0):
        self.rows = rows
        self.after = after
        self.steps = 0
        self.fired = False
        self.prefilled = collections.Counter()

    def __call__(self, module, args, kwargs):
        input_ids = kwargs["input_ids"]
        mask = kwargs["attention_mask"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache.get_seq_length() == 0
        if prefill:
            for ids, row_mask in zip(input_ids.tolist(), mask.tolist()):
                self.prefilled[tuple(i for i, m in zip(ids, row_mask) if m)] += 1
        else:
            self.steps += 1
        if not prefill and not self.fired and self.steps > self.after and input_ids.shape[0] >= self.rows:
            self.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_out_of_memory_shrinks_slots_and_keeps_finished_work(llama):
    model, tokenizer = llama
    prompts, _ = random_prompts(model.config.vocab_size, 12, seed=7)
    budgets = [2, 20, 3, 20, 2, 20, 4, 20, 2, 20, 3, 20]
    params = make_params(do_sample=False, eos_token_id=None)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    hook = OOMOnce(rows=6, after=5)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = ContinuousEngine(model, tokenizer, max_slots=8)
        done_before_oom = []
        results = []
        for request, output in engine.run(requests):
            results.append((request, output))
            if not hook.fired:
                done_before_oom.append(request.id)
    finally:
        handle.remove()
    assert hook.fired
    assert engine.stats.oom_retries == 1 and engine.stats.batch_size < 8
    assert sorted(r.id for r, _ in results) == list(range(12))  # every request exactly once
    for request, output in results:
        expected = unbatched(model, request.token_ids, GenerationConfig(do_sample=False, eos_token_id=None),
                             request.max_new_tokens)[0]
        assert output.sequences == [expected]
    # a request finished before the OOM was prefilled once; the others at most twice (evicted, re-run)
    assert done_before_oom
    for request in requests:
        count = hook.prefilled[tuple(request.token_ids)]
        assert count == 1 if request.id in done_before_oom else 1 <= count <= 2


def test_out_of_memory_at_one_slot_is_an_error(llama):
    model, tokenizer = llama
    params = make_params(do_sample=False, eos_token_id=None)
    requests = [Request(id=0, token_ids=[5, 6, 7], params=params, max_new_tokens=4)]
    hook = OOMOnce(rows=1)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(BatchFailed) as failed:
            list(ContinuousEngine(model, tokenizer, max_slots=1).run(requests))
        assert failed.value.request_ids == [0] and isinstance(failed.value.cause, torch.OutOfMemoryError)
        hook.fired = False
        results = list(ContinuousEngine(model, tokenizer, max_slots=1).run(requests, isolate_errors=True))
    finally:
        handle.remove()
    assert results[0][1].error.startswith("OutOfMemoryError")


def test_isolate_errors_fails_only_the_bad_request(llama):
    model, tokenizer = llama
    prompts, budgets = random_prompts(model.config.vocab_size, 6)
    params = make_params(do_sample=False, eos_token_id=None)
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    requests.append(Request(id=99, token_ids=[5, model.config.vocab_size + 50, 6], params=params, max_new_tokens=3))
    with pytest.raises(BatchFailed) as failed:  # the façade's signal: these requests failed, keep the rest
        list(ContinuousEngine(model, tokenizer, max_slots=3).run(requests))
    assert 99 in failed.value.request_ids and isinstance(failed.value.cause, IndexError)
    results = dict((r.id, o) for r, o in ContinuousEngine(model, tokenizer, max_slots=3).run(
        requests, isolate_errors=True))
    assert sorted(results) == [0, 1, 2, 3, 4, 5, 99]
    assert results[99].error.startswith("IndexError") and not results[99].sequences
    for request in requests[:-1]:
        assert results[request.id].error is None
        expected = unbatched(model, request.token_ids, GenerationConfig(do_sample=False, eos_token_id=None),
                             request.max_new_tokens)[0]
        assert results[request.id].sequences == [expected]


def test_zero_budget_and_empty_prompt(llama):
    model, tokenizer = llama
    params = make_params(do_sample=True, num_return_sequences=2)
    requests = [Request(id=0, token_ids=[5, 6], params=params, max_new_tokens=0),
                Request(id=1, token_ids=[], params=params, max_new_tokens=3)]
    results = dict((r.id, o) for r, o in ContinuousEngine(model, tokenizer).run(requests, isolate_errors=True))
    assert results[0].sequences == [[], []]
    assert "no prompt tokens" in results[1].error


# ---------------------------------------------------------------------------------------------- other architectures
def _tiny_causal(arch: str):
    """A random tiny model of ``arch`` built like simple_generation.tiny does (large init, separated logits)."""
    import transformers as tf

    common = {"vocab_size": 300, "max_position_embeddings": 256, "initializer_range": 0.2,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    llama_like = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2}
    configs = {
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, init_std=0.2, **{**common, "initializer_range": 0.2}),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, rotary_pct=0.5, **common),
        "qwen2": lambda: tf.Qwen2Config(**llama_like, **common),
        "mistral": lambda: tf.MistralConfig(sliding_window=None, **llama_like, **common),
        "phi": lambda: tf.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, partial_rotary_factor=0.5, **common),
        "gemma": lambda: tf.GemmaConfig(head_dim=16, **llama_like, **common),
        "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=False, multi_query=True, alibi=False, **common),
        "gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, vocab_size=300,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=300,
                                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                                   pad_token_id=0),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **llama_like, **common),
        "phi3": lambda: tf.Phi3Config(**{**llama_like, "num_key_value_heads": 4}, **common),
        "llama3_rope": lambda: tf.LlamaConfig(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, **llama_like, **common),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, **llama_like, **common),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[arch]()).eval()


# The quick tier keeps three of them; the rest are slow.
@pytest.mark.parametrize("arch", ["opt", "gpt_neox", "qwen2"] + [
    pytest.param(arch, marks=pytest.mark.slow) for arch in
    ("mistral", "phi", "gemma", "falcon", "gptj", "gpt_bigcode", "qwen3", "phi3", "llama3_rope", "gemma2")])
def test_other_architectures_greedy_equal_unbatched(arch):
    model = _tiny_causal(arch)
    engine = ContinuousEngine(model, None, max_slots=3)
    prompts, budgets = random_prompts(model.config.vocab_size, 8, seed=2)
    eos = [2, frequent_token(model, prompts, budget=12)]
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=0)
    params = GenerationParams(config=config, call_kwargs={}, stop_strings=(), seed=None, fingerprint="x")
    assert engine.unsupported(params) is None
    requests = [Request(id=i, token_ids=p, params=params, max_new_tokens=b)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    results = list(engine.run(requests))
    assert len(results) == len(requests)
    for request, output in results:
        expected = trim(unbatched(model, request.token_ids, config, request.max_new_tokens)[0], set(eos), None)
        assert output.sequences == [expected], (arch, request.id)
