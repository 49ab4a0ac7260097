"""The OpenVINO engine on a tiny Llama: exact greedy answers (f32), per-request budgets, cache, refusals.

Runs where openvino-genai and optimum-intel are installed (``bash scripts/engine-env.sh openvino``, then
``.venv-openvino/bin/python -m pytest tests/test_engine_openvino.py``); skips cleanly elsewhere.
"""

import dataclasses

import pytest

pytest.importorskip("openvino_genai")
pytest.importorskip("optimum.intel")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from simple_generation.engines import engine_class  # noqa: E402
from simple_generation.engines.base import EngineContext  # noqa: E402
from simple_generation.requests import Request  # noqa: E402

from .engine_helpers import (  # noqa: E402
    assert_beams_equal_hf,
    engine_context,
    fp32_model,
    make_params,
    run_all,
    static_answers,
    tokenized_prompts,
    trim_eos,
    two_process_records,
)
from .prompts import PROMPTS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ov-cache"))


@pytest.fixture(scope="module")
def engine_factory(llama_path, ov_cache):
    def make(**engine_kwargs):
        engine_kwargs.setdefault("ov_cache_dir", ov_cache)
        return engine_class("openvino").create(engine_context(llama_path, **engine_kwargs))

    return make


@pytest.fixture(scope="module")
def engine(engine_factory):
    return engine_factory()


@pytest.fixture(scope="module")
def prompt_ids(llama_path):
    return tokenized_prompts(llama_path)


@pytest.fixture(scope="module")
def hf_model(llama_path):
    return fp32_model(llama_path)


def hf_greedy_ids(model, ids, max_new_tokens):
    output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, len(ids):].tolist()


def test_available_and_kwargs():
    cls = engine_class("openvino")
    assert cls.available() is None
    assert cls.accepts_kwarg("inference_precision") and cls.accepts_kwarg("weight_format")
    assert cls.accepts_kwarg("prefix_cache")
    assert not cls.accepts_kwarg("tensor_parallel_size")
    assert cls.needs_hf_model is False


def test_greedy_f32_equals_hf_unbatched_with_per_request_budgets(engine, prompt_ids, hf_model, llama_path):
    params = make_params(do_sample=False, max_new_tokens=24, eos_token_id=hf_model.config.eos_token_id)
    budgets = [24 - 3 * (i % 5) for i in range(len(prompt_ids))]
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=budgets[i])
                for i, ids in enumerate(prompt_ids)]
    outputs = run_all(engine, requests)
    eos = hf_model.config.eos_token_id
    for request in requests:
        [sequence] = outputs[request.id].sequences
        assert len(sequence) <= request.max_new_tokens
        expected = hf_greedy_ids(hf_model, request.token_ids, request.max_new_tokens)
        assert trim_eos(sequence, eos) == trim_eos(expected, eos), f"prompt {request.id}"
        if eos not in sequence:
            assert len(sequence) == request.max_new_tokens
            assert outputs[request.id].finish_reasons == ["length"]
    assert engine.stats.batch_size > 1


def test_greedy_equals_raw_openvino_pipeline(engine, prompt_ids):
    import openvino
    import openvino_genai

    raw = openvino_genai.LLMPipeline(str(engine.model_dir), "CPU", **engine.properties)
    params = make_params(do_sample=False, max_new_tokens=16, eos_token_id=1)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=16) for i, ids in enumerate(prompt_ids)]
    outputs = run_all(engine, requests)
    for request in requests:
        config = openvino_genai.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=1)
        result = raw.generate(openvino.Tensor(np.asarray([request.token_ids], dtype=np.int64)), config)
        assert outputs[request.id].sequences == [list(result.tokens[0])], f"prompt {request.id}"


def test_sampling_n_and_seed(engine, prompt_ids):
    params = make_params(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, num_return_sequences=3,
                         max_new_tokens=12, eos_token_id=1)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=12, seed=1234)
                for i, ids in enumerate(prompt_ids[:4])]
    first = run_all(engine, requests)
    for output in first.values():
        assert len(output.sequences) == 3 and all(len(s) <= 12 for s in output.sequences)
    again = run_all(engine, requests)
    assert {i: o.sequences for i, o in first.items()} == {i: o.sequences for i, o in again.items()}
    alone = run_all(engine, requests[2:3])
    assert alone[2].sequences == first[2].sequences  # the seed, not the batch, decides a sampled answer


def test_export_is_cached(engine_factory, engine):
    second = engine_factory()
    assert second.model_dir == engine.model_dir
    assert second.export_seconds < 2.0


def test_unsupported_and_errors(engine):
    assert engine.unsupported(make_params(do_sample=False)) is None
    assert engine.unsupported(make_params(do_sample=False, num_beams=2)) is None  # feature: beam search: native
    assert "beam sampling" in engine.unsupported(make_params(do_sample=True, num_beams=2))
    streaming = dataclasses.replace(make_params(do_sample=False), call_kwargs={"streamer": object()})
    assert "streamer" in engine.unsupported(streaming)
    with_tokenizer = dataclasses.replace(make_params(do_sample=False), call_kwargs={"tokenizer": object()})
    assert engine.unsupported(with_tokenizer) is None
    params = make_params(do_sample=False, max_new_tokens=4, eos_token_id=1)
    requests = [Request(id=0, token_ids=[], params=params, max_new_tokens=4),
                Request(id=1, token_ids=[0, 5, 6], params=params, max_new_tokens=4)]
    outputs = run_all(engine, requests, isolate_errors=True)
    assert outputs[0].error and not outputs[0].sequences
    assert len(outputs[1].sequences[0]) == 4
    with pytest.raises(ValueError):
        run_all(engine, requests)


def test_bf16_mode_runs(engine_factory, prompt_ids):
    """bf16 compute is the user's choice (faster on AMX CPUs); answers may differ from HF's f32 ones."""
    engine = engine_factory(inference_precision="bf16")
    assert engine.properties["INFERENCE_PRECISION_HINT"] == "bf16"
    params = make_params(do_sample=False, max_new_tokens=8, eos_token_id=1)
    outputs = run_all(engine, [Request(id=0, token_ids=prompt_ids[1], params=params, max_new_tokens=8)])
    assert 1 <= len(outputs[0].sequences[0]) <= 8


def test_encoder_decoder_refused(t5_path):
    context = EngineContext(model_name_or_path=t5_path, tokenizer=None, config=None, is_encoder_decoder=True)
    with pytest.raises(ValueError, match="decoder-only"):
        engine_class("openvino").create(context)


def test_through_simple_generator(llama_path, ov_cache):
    """The façade: templates/tokenization ours, generation OpenVINO's; greedy answers equal the HF engine's."""
    from simple_generation import SimpleGenerator

    try:
        generator = SimpleGenerator(llama_path, engine="openvino", ov_cache_dir=ov_cache)
    except TypeError as error:  # a façade without engines
        pytest.skip(f"SimpleGenerator has no engine= here: {error}")
    prompts = PROMPTS[:6]
    answers = generator(prompts, max_new_tokens=12, temperature=0, skip_prompt=True)
    assert answers == SimpleGenerator(llama_path)(prompts, max_new_tokens=12, temperature=0, skip_prompt=True)


def test_auto_moves_greedy_calls_to_openvino_and_resumes(llama_path, tmp_path, monkeypatch):
    """engine="auto" with fast_engine_after_s=0: greedy calls run on OpenVINO (answers equal the HF
    engines'), sampled calls stay on HF, and a store filled by OpenVINO answers a rerun."""
    from simple_generation import SimpleGenerator

    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "cache"))
    prompts = PROMPTS[:8]
    reference = SimpleGenerator(llama_path, engine="continuous", track_emissions=False)
    expected = reference(prompts, max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False)

    gen = SimpleGenerator(llama_path, fast_engine_after_s=0, track_emissions=False)
    store = tmp_path / "answers.sqlite"
    answers = gen(prompts, max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False,
                  store=store)
    assert gen.last_run.engine == "openvino" and "openvino" in gen.last_run.engine_reason
    assert answers == expected
    results = gen.generate(prompts, max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False,
                           store=store)
    assert all(r.cached for r in results) and [r.text for r in results] == expected

    # a fresh process's rerun of the finished job: every answer comes from the store, nothing is started
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "unused-cache"))
    fresh = SimpleGenerator(llama_path, fast_engine_after_s=0, track_emissions=False)
    rerun = fresh.generate(prompts, max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False,
                           store=store)
    assert all(r.cached for r in rerun) and [r.text for r in rerun] == expected
    assert "openvino not started" in fresh.last_run.engine_reason
    assert not (tmp_path / "unused-cache" / "openvino").exists()  # no export (the file-hash cache may be there)

    gen(prompts[:2], max_new_tokens=4, do_sample=True, seed=1, show_progress_bar=False)
    assert gen.last_run.engine == "continuous"

    default = SimpleGenerator(llama_path, track_emissions=False)  # the rule: a tiny call does not pay
    assert default(prompts, max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False) == expected
    assert default.last_run.engine == "continuous" and "would not pay" in default.last_run.engine_reason


def test_logprobs_go_to_an_hf_engine_under_auto_and_are_refused_when_openvino_is_named(llama_path, ov_cache,
                                                                                       tmp_path, monkeypatch):
    """feature: logprobs: OpenVINO GenAI gives the chosen token's logprob only; calls asking for logprobs run
    on an HF engine under auto (even with fast_engine_after_s=0) and are a clear error with engine="openvino"."""
    from simple_generation import SimpleGenerator

    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "cache"))
    gen = SimpleGenerator(llama_path, fast_engine_after_s=0, track_emissions=False)
    result = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, logprobs=1, show_progress_bar=False)[0]
    assert gen.last_run.engine == "continuous" and len(result.outputs[0].logprobs) == len(result.outputs[0].token_ids)
    named = SimpleGenerator(llama_path, engine="openvino", ov_cache_dir=ov_cache, track_emissions=False)
    with pytest.raises(ValueError, match="does not return logprobs"):
        named.generate(PROMPTS[:1], max_new_tokens=4, temperature=0, logprobs=0, show_progress_bar=False)


def test_auto_falls_back_when_openvino_cannot_start(llama_path, tmp_path, monkeypatch, caplog):
    from simple_generation import SimpleGenerator

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the cache root is a file: the export cannot write there")
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(blocker))
    gen = SimpleGenerator(llama_path, fast_engine_after_s=0, track_emissions=False)
    with caplog.at_level("WARNING", logger="simple_generation"):
        answers = gen(PROMPTS[:4], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert gen.last_run.engine == "continuous"
    assert any("openvino engine could not start" in r.getMessage() for r in caplog.records)
    reference = SimpleGenerator(llama_path, engine="static", track_emissions=False)
    assert answers == reference(PROMPTS[:4], max_new_tokens=6, temperature=0, skip_prompt=True,
                                show_progress_bar=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="simple_generation"):
        gen(PROMPTS[:2], max_new_tokens=6, temperature=0, show_progress_bar=False)
    assert not any("could not start" in r.getMessage() for r in caplog.records)  # not retried every call


def test_lora_is_merged_into_the_export(llama_path, lora_adapter, ov_cache):
    """lora_weights with OpenVINO: the adapter merged before the export gives the HF engines' answers."""
    from simple_generation import SimpleGenerator

    prompts = PROMPTS[:6]
    kwargs = dict(max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False)
    answers = SimpleGenerator(llama_path, engine="openvino", lora_weights=lora_adapter, ov_cache_dir=ov_cache,
                              track_emissions=False)(prompts, **kwargs)
    hf = SimpleGenerator(llama_path, engine="static", lora_weights=lora_adapter, track_emissions=False)
    assert answers == hf(prompts, **kwargs)
    base = SimpleGenerator(llama_path, engine="static", track_emissions=False)
    assert answers != base(prompts, **kwargs)  # the adapter changes answers: it was applied


def test_one_engine_per_process_under_accelerate_launch(llama_path, tmp_path):
    """Two `accelerate launch` processes, each with its own OpenVINO engine (one export, shared through the
    cache without a race): every rank returns every answer, in order, equal to one process's."""
    cache = tmp_path / "cache"
    records = two_process_records(llama_path, tmp_path, "openvino", ov_cache_dir=str(cache), num_threads=1)
    expected = static_answers(llama_path, PROMPTS)
    for record in records:
        assert record["world_size"] == 2 and record["engine"] == "openvino"
        assert record["answers"] == expected
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] and \
        not [p for p in cache.iterdir() if p.name.startswith(".export-")]


def test_cli_fast_engine_after(llama_path, tmp_path):
    """`simple-generation run --fast-engine-after 0`: the job runs on OpenVINO (the log says so), and its
    records equal those of the same job on the static engine."""
    import json
    import os
    import subprocess
    import sys

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    env = dict(os.environ, SIMPLE_GENERATION_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")

    def run(out, *extra):
        done = subprocess.run([sys.executable, "-m", "simple_generation.cli", "run", llama_path, "--input",
                               str(source), "--output", str(out), "--max-new-tokens", "8", "--temperature", "0",
                               "--no-emissions", *extra], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in out.read_text().splitlines()], done.stderr

    fast, log = run(tmp_path / "fast.jsonl", "--fast-engine-after", "0")
    assert "auto: openvino" in log
    static, _ = run(tmp_path / "static.jsonl", "--engine", "static")
    assert [r["answer"] for r in fast] == [r["answer"] for r in static]


# feature: beam search -------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{}, {"length_penalty": 0.0, "early_stopping": "never"},
                                      {"length_penalty": 2.0, "early_stopping": True}])
def test_beam_search_f32_equals_hf_unbatched(engine, prompt_ids, hf_model, settings):
    """num_beams runs on OpenVINO GenAI's own beam search (length_penalty, and early_stopping as its
    stop_criteria EARLY/HEURISTIC/NEVER); its beams equal HF's unbatched beam search, best first, with an EOS the
    beams often meet (so they finish at different lengths and steps)."""
    assert_beams_equal_hf(engine, prompt_ids, hf_model, settings, max_new_tokens=10, budget_step=2)


# feature: reasoning -----------------------------------------------------------------------------------------
def test_reasoning_is_split_on_this_engine_as_on_static(llama_path, ov_cache, tmp_path_factory):
    """The <think> split is post-processing, the same for every engine: a Qwen3-style checkpoint whose template
    opens the block (head size 64) answers alike here and on the static engine, reasoning split off."""
    from simple_generation import SimpleGenerator

    from .test_reasoning import build_reasoning_checkpoint

    path = build_reasoning_checkpoint(llama_path, tmp_path_factory.mktemp("qwen3-openvino") / "qwen3", special=False,
                                      hidden=128, heads=2)
    answers = {}
    for engine, options in (("static", {}), ("openvino", {"ov_cache_dir": ov_cache})):
        gen = SimpleGenerator(path, engine=engine, apply_chat_template=True, track_emissions=False, **options)
        results = gen.generate(["What is 2 + 2?", "Tell me a story"], max_new_tokens=6, do_sample=False,
                               skip_prompt=True, show_progress_bar=False)
        answers[engine] = [(r.reasoning, r.text, r.finish_reason) for r in results]
    assert answers["openvino"] == answers["static"]
    assert all(reasoning and text == "" for reasoning, text, _ in answers["static"])


def test_structured_output_native_or_refused_clearly(llama_path, ov_cache):
    """feature: structured output: StructuredOutputConfig when the OpenVINO tokenizer exposes its vocabulary
    (answers conform); otherwise (the tiny local tokenizers here) a clear refusal naming the reason."""
    import json
    import re

    from simple_generation import SimpleGenerator
    from simple_generation.errors import NoEngineError

    generator = SimpleGenerator(llama_path, engine="openvino", ov_cache_dir=ov_cache)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
    params = [{"json_schema": schema}, {"regex": "[0-9]{3}"}, {"choices": ["yes", "no"]}]
    problem = generator.router.engine("openvino").structured_output_problem()
    if problem is not None:
        with pytest.raises(NoEngineError, match="does not expose its vocabulary"):
            generator(PROMPTS[:3], params=params, max_new_tokens=32, temperature=0)
        return
    results = list(generator.generate(PROMPTS[:3], params=params, max_new_tokens=32, temperature=0,
                                      skip_prompt=True))
    if results[0].outputs[0].finish_reason != "length":
        assert isinstance(json.loads(results[0].answer)["name"], str)
    assert re.fullmatch("[0-9]{3}", results[1].answer)
    assert results[2].answer in ("yes", "no")
    with pytest.raises(NoEngineError, match="any-JSON"):
        generator(PROMPTS[:1], json=True, max_new_tokens=8)


# prefix caching (issue 23) ------------------------------------------------------------------------------------
# one long beginning shared by every prompt (82 tokens with BOS), then a short question
SHARED_PREFIX = ("You answer questions about the library. The library runs text generation over checkpoints: give it "
                 "a model and a list of prompts. Researchers evaluate models on thousands of prompts, and engineers "
                 "generate data for training. Example: Tell me what is two plus two? Two plus two is four. ")
QUESTIONS = ["What is the most popular programming language?", "What kind of noises did dinosaurs make?",
             "Translate this sentence to Spanish, please.", "Once upon a time", "Hi", "Write a poem about the sea."]


def test_prefix_cache_on_by_default_keeps_answers_exact(engine_factory, llama_path, hf_model):
    """OpenVINO GenAI's prefix caching (SchedulerConfig.enable_prefix_caching) is on by default and off with
    prefix_cache=False; greedy f32 answers over prompts sharing a long beginning are HF's unbatched ones either
    way, on a first and a second pass (the shared beginning computed first, then reused within the call and
    across calls). OpenVINO exposes no hit counts, but a second pass over the same prompts needs fewer new KV
    blocks only with the cache on (its pipeline metrics' cache usage)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    prompt_ids = [tokenizer(SHARED_PREFIX + question)["input_ids"] for question in QUESTIONS]
    import os

    from simple_generation.engines.openvino import shared_prefixes

    # what the engine computes first within a call (OpenVINO looks the cache up only as requests are added)
    common = os.path.commonprefix(prompt_ids)  # the beginning every prompt shares, in whole 32-token blocks
    assert len(common) >= 64 and shared_prefixes(prompt_ids, 32) == [common[:len(common) // 32 * 32]]
    eos = hf_model.config.eos_token_id
    params = make_params(do_sample=False, max_new_tokens=10, eos_token_id=eos)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=10) for i, ids in enumerate(prompt_ids)]
    expected = [hf_greedy_ids(hf_model, ids, 10) for ids in prompt_ids]
    usage = {}  # fresh pipelines: cache usage is relative to a capacity that grows with what a pipeline has run
    for on, pipeline in ((True, engine_factory()), (False, engine_factory(prefix_cache=False))):
        pipeline.configure(8, True)
        assert pipeline.prefix_caching is on and pipeline.stats.prefix_caching is on
        for _ in range(2):
            outputs = run_all(pipeline, requests)
            for request in requests:
                assert trim_eos(outputs[request.id].sequences[0], eos) == trim_eos(expected[request.id], eos)
        usage[on] = pipeline.pipeline.get_metrics().max_cache_usage  # of the second pass
    assert usage[True] < usage[False]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_last_run_shows_prefix_caching(llama_path, ov_cache, prefix_cache):
    """Through the façade: ``last_run.prefix_caching`` says whether OpenVINO reused shared beginnings (on by
    default, off with ``prefix_cache=False``); answers equal the static engine's either way."""
    from simple_generation import SimpleGenerator

    options = {} if prefix_cache else {"prefix_cache": False}
    gen = SimpleGenerator(llama_path, engine="openvino", ov_cache_dir=ov_cache, track_emissions=False, **options)
    kwargs = dict(max_new_tokens=10, temperature=0, skip_prompt=True, show_progress_bar=False)
    prompts = [SHARED_PREFIX + question for question in QUESTIONS]
    answers = gen(prompts, **kwargs)
    assert gen.last_run.engine == "openvino" and gen.last_run.prefix_caching is prefix_cache
    assert gen.last_run.prefix_cached_tokens == 0  # OpenVINO GenAI does not report its hits
    assert answers == SimpleGenerator(llama_path, engine="static", track_emissions=False)(prompts, **kwargs)


def test_prefix_cache_with_prompts_that_begin_other_prompts_mid_block(engine_factory, llama_path, hf_model):
    """A prompt that ends inside a KV block and is the beginning of later prompts: its answer's tokens are
    written into that block; later prompts that go on differently must not reuse them (both in one call and
    in a later call)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    base = tokenizer(SHARED_PREFIX)["input_ids"][:45]            # ends inside the second 32-token block
    extra = tokenizer(" ".join(QUESTIONS))["input_ids"][1:]
    prompt_ids = [base, base + extra[:7], base + extra[7:20], base[:40] + extra[:30]]
    eos = hf_model.config.eos_token_id
    params = make_params(do_sample=False, max_new_tokens=8, eos_token_id=eos)
    expected = [trim_eos(hf_greedy_ids(hf_model, ids, 8), eos) for ids in prompt_ids]
    engine = engine_factory()
    engine.configure(8, True)
    for calls in ([[0], [1, 2, 3]], [[0, 1, 2, 3]]):
        for ids in calls:
            requests = [Request(id=i, token_ids=prompt_ids[i], params=params, max_new_tokens=8) for i in ids]
            outputs = run_all(engine, requests)
            for i in ids:
                assert trim_eos(outputs[i].sequences[0], eos) == expected[i], (calls, i)


# feature: images (issue 24) ------------------------------------------------------------------------------------
# The tiny LLaVA of tests/vlm_models.py, built here with this venv's transformers (optimum-intel pins its own: a
# checkpoint saved by another transformers may not load its vision tower's weights here).

IMAGE_PROMPTS = ["Describe the image.", "What color is the sky?", "Tell me what is two plus two?",
                 "Caption this photo.", "What is in this picture?"]


@pytest.fixture(scope="module")
def ov_vlm(tmp_path_factory):
    from .vlm_models import build_vlm

    root = tmp_path_factory.mktemp("ov-vlm")
    return lambda kind: build_vlm(kind, root / kind)


@pytest.fixture(scope="module")
def llava_generator(ov_vlm, ov_cache):
    from simple_generation import SimpleGenerator

    return SimpleGenerator(ov_vlm("llava"), engine="openvino", ov_cache_dir=ov_cache, track_emissions=False)


def test_images_greedy_f32_equal_hf_unbatched(llava_generator, tmp_path):
    """engine="openvino" on LLaVA (f32, greedy): one call mixing one image, two images of other sizes, no image,
    an RGBA image and a missing file answers token for token as HF's unbatched generate; the missing image is that
    prompt's error; the store answers the rerun; a prompt of one image with a 32-token block of text after it, run
    again with another image, answers for its own image (no prefix-cache reuse across images); beam search and
    sampling run."""
    from .vlm_models import chat_text, hf_reference, load, make_image

    gen = llava_generator
    path = gen.model_name_or_path
    images = [make_image(1, (48, 40)), [make_image(2, (100, 60)), make_image(3, (20, 80))], None,
              [make_image(4, (64, 64), mode="RGBA")], "missing.png"]
    call = dict(max_new_tokens=12, temperature=0, skip_prompt=True, show_progress_bar=False, on_error="record",
                store=str(tmp_path / "answers.sqlite"))
    first = gen.generate(IMAGE_PROMPTS, images=images, **call)
    assert gen.last_run.engine == "openvino"
    for prompt, found, result in zip(IMAGE_PROMPTS[:4], images[:4], first[:4]):
        found = [] if found is None else found if isinstance(found, list) else [found]
        text = chat_text(path, prompt, len(found)) if found else prompt
        assert result.error is None and not result.cached
        assert result.outputs[0].token_ids == hf_reference(path, text, found, 12), prompt
    assert first[4].error.startswith("texts[4], image 0") and "missing.png" in first[4].error
    again = gen.generate(IMAGE_PROMPTS, images=images, **call)
    assert [(r.outputs[0].token_ids, r.cached) for r in again[:4]] == [(r.outputs[0].token_ids, True)
                                                                       for r in first[:4]]

    long_prompt = "Describe the image. " * 8
    text = chat_text(path, long_prompt, 1)
    for seed in (7, 8, 7):
        image = make_image(seed, (48, 40))
        [result] = gen.generate([long_prompt], images=[image], max_new_tokens=12, temperature=0, skip_prompt=True,
                                show_progress_bar=False)
        assert result.outputs[0].token_ids == hf_reference(path, text, [image], 12), seed

    image = make_image(9, (48, 40))
    [beams] = gen.generate([IMAGE_PROMPTS[0]], images=[image], max_new_tokens=6, temperature=0, num_beams=2,
                           skip_prompt=True, show_progress_bar=False)
    model, processor = load(path)
    text = chat_text(path, IMAGE_PROMPTS[0], 1)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, num_beams=2, max_new_tokens=6)
    assert beams.outputs[0].token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist()
    [sampled] = gen.generate([IMAGE_PROMPTS[0]], images=[image], max_new_tokens=6, temperature=0.8,
                             num_return_sequences=3, seed=1, skip_prompt=True, show_progress_bar=False)
    assert len(sampled.outputs) == 3 and all(1 <= len(o.token_ids) <= 6 for o in sampled.outputs)


def test_image_requests_openvino_would_read_otherwise_are_refused(llava_generator, tmp_path, monkeypatch):
    """The engine decodes a request's images when it adds it: a file gone since the call was planned is that
    request's error. A prompt OpenVINO GenAI would read as other tokens than the HF processor made (its LLaVA
    expansion writes "\\n" after each image: a hand-formatted "<image> What" has none; HF ids with one image token
    more) is refused, never answered; the other requests still get HF's answers."""
    from .vlm_models import hf_reference, make_image

    gen = llava_generator
    path = gen.model_name_or_path
    monkeypatch.chdir(tmp_path)
    make_image(5).save("late.png")
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
    text = gen.vision.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
    late, kept = (gen.vision.process(text, [source], f"texts[{i}]") for i, source in enumerate(["late.png",
                                                                                                 make_image(6)]))
    no_newline = "USER: <image> What is in this picture? ASSISTANT:"
    inline = gen.vision.process(no_newline, [make_image(6)], "texts[2]")
    image_id = gen.config.image_token_id
    skewed = kept.token_ids[:kept.token_ids.index(image_id)] + [image_id] + kept.token_ids[kept.token_ids.index(
        image_id):]
    params = make_params(do_sample=False, max_new_tokens=12, eos_token_id=gen.tokenizer.eos_token_id)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=12, media=prompt.media)
                for i, (ids, prompt) in enumerate([(late.token_ids, late), (kept.token_ids, kept),
                                                   (inline.token_ids, inline), (skewed, kept)])]
    import os

    os.remove("late.png")
    outputs = run_all(gen.engine, requests, isolate_errors=True)
    assert "late.png" in outputs[0].error and not outputs[0].sequences
    assert outputs[1].error is None
    assert outputs[1].sequences[0][:12] == hf_reference(path, text, [make_image(6)], 12)
    for i in (2, 3):
        assert "OpenVINO GenAI would read this prompt as" in outputs[i].error and not outputs[i].sequences
    with pytest.raises(ValueError, match="OpenVINO GenAI would read"):
        run_all(gen.engine, requests[2:3])


def test_image_models_other_than_llava_are_refused_at_start(ov_vlm, ov_cache):
    """Only LLaVA's prompts were checked to be read by OpenVINO GenAI as HF's: an Idefics3 config is refused before
    any export (the checkpoint is never read)."""
    from transformers import Idefics3Config

    context = EngineContext(model_name_or_path=ov_vlm("llava"), tokenizer=None, config=Idefics3Config(),
                            is_encoder_decoder=False, engine_kwargs={"ov_cache_dir": ov_cache}, is_vision=True)
    with pytest.raises(ValueError, match="image-text models of type \\['llava'\\] only, not 'idefics3'"):
        engine_class("openvino").create(context)
