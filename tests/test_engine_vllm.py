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
    for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager", "vllm_in_process"):
        assert cls.accepts_kwarg(name), name
    for name in ("dtype", "model", "revision", "inference_precision", "max_new_tokens"):
        assert not cls.accepts_kwarg(name), name


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
    assert "beam" in engine.unsupported(make_params(do_sample=False, num_beams=2))
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
