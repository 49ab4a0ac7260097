"""How ``engine="auto"`` weighs a fast engine's start-up against the size of a call.

The rule itself is tested here; moving real calls to OpenVINO and vLLM is tested in their environments
(``tests/test_engine_openvino.py``, ``tests/test_engine_vllm.py``).
"""

import importlib.util

import pytest

from simple_generation import SimpleGenerator
from simple_generation.engines.select import (
    FastEngineEstimate,
    JobSize,
    fast_engine_estimates,
    hf_seconds,
    installed_fast_engines,
    pick_fast_engine,
)

from .prompts import PROMPTS

GREEDY = JobSize(requests=100, prompt_tokens=2_000, new_tokens=10_000, greedy=True)
SAMPLED = JobSize(requests=100, prompt_tokens=2_000, new_tokens=10_000, greedy=False)
FAST = FastEngineEstimate("openvino", startup_s=10.0, speedup=3.0)


def test_a_fast_engine_is_taken_only_when_it_halves_the_estimated_time():
    # 10 s start-up and 3x: start-up + hf/3 <= hf/2 from hf = 60 s on
    assert pick_fast_engine(GREEDY, 59.0, [FAST])[0] is None
    name, why = pick_fast_engine(GREEDY, 61.0, [FAST])
    assert name == "openvino" and "61 s on HF" in why
    name, why = pick_fast_engine(GREEDY, 5.0, [FAST])
    assert name is None and "would not pay" in why
    slow_start = FastEngineEstimate("vllm", startup_s=100.0, speedup=3.0)
    assert pick_fast_engine(GREEDY, 61.0, [slow_start, FAST])[0] == "openvino"  # the soonest done
    quick = FastEngineEstimate("vllm", startup_s=12.0, speedup=10.0)
    assert pick_fast_engine(GREEDY, 1000.0, [FAST, quick])[0] == "vllm"


def test_sampled_calls_stay_on_the_hf_engines():
    name, why = pick_fast_engine(SAMPLED, 1e6, [FAST])
    assert name is None and "sampled" in why
    assert pick_fast_engine(SAMPLED, 1e6, [FAST], after_s=0)[0] is None


def test_after_s_replaces_the_rule():
    assert pick_fast_engine(GREEDY, 0.001, [FAST], after_s=0)[0] == "openvino"
    assert pick_fast_engine(GREEDY, 30.0, [FAST], after_s=20)[0] == "openvino"
    assert pick_fast_engine(GREEDY, 10.0, [FAST], after_s=20)[0] is None
    assert pick_fast_engine(GREEDY, 1e9, [FAST], after_s=float("inf"))[0] is None
    assert pick_fast_engine(GREEDY, 1e9, [], after_s=0)[0] is None


def test_hf_estimate_scales_with_model_job_and_threads():
    base = hf_seconds(100_000_000, GREEDY, on_gpu=False, threads=1)
    assert hf_seconds(200_000_000, GREEDY, on_gpu=False, threads=1) == pytest.approx(2 * base)
    assert hf_seconds(100_000_000, GREEDY, on_gpu=False, threads=2) == pytest.approx(base / 2)
    bigger = JobSize(requests=200, prompt_tokens=4_000, new_tokens=20_000, greedy=True)
    assert hf_seconds(100_000_000, bigger, on_gpu=False, threads=1) == pytest.approx(2 * base)
    assert hf_seconds(100_000_000, GREEDY, on_gpu=True, threads=1) < base / 100


def test_candidates_keep_fp32_answers_exact():
    assert [c.name for c in fast_engine_estimates(10**8, "float32", on_gpu=False)] == ["openvino"]
    assert [c.name for c in fast_engine_estimates(10**8, "bfloat16", on_gpu=False)] == ["vllm", "openvino"]
    assert fast_engine_estimates(10**8, "float32", on_gpu=True) == []
    assert [c.name for c in fast_engine_estimates(10**8, "float16", on_gpu=True)] == ["vllm"]
    small, large = (fast_engine_estimates(n, "float32", on_gpu=False)[0] for n in (10**8, 7 * 10**9))
    assert large.startup_s > small.startup_s and large.extra_memory_bytes > small.extra_memory_bytes


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is not None
                    or importlib.util.find_spec("vllm") is not None, reason="a fast engine is installed here")
def test_uninstalled_engines_are_not_candidates():
    kept, skipped = installed_fast_engines(fast_engine_estimates(10**8, "float32", on_gpu=False)
                                           + fast_engine_estimates(10**8, "bfloat16", on_gpu=False))
    assert kept == []
    assert any("openvino" in line and "not installed" in line for line in skipped)
    assert any("vllm" in line and "not installed" in line for line in skipped)


def test_too_little_memory_rules_a_candidate_out():
    huge = FastEngineEstimate("static", startup_s=1.0, speedup=3.0, extra_memory_bytes=1 << 60)
    kept, skipped = installed_fast_engines([huge])
    assert kept == [] and "GiB more memory" in skipped[0]


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is not None
                    or importlib.util.find_spec("vllm") is not None, reason="a fast engine is installed here")
def test_auto_without_fast_engines_stays_on_hf(llama_path):
    gen = SimpleGenerator(llama_path, fast_engine_after_s=0, track_emissions=False)
    answers = gen(PROMPTS[:4], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert gen.last_run.engine == "continuous"
    reference = SimpleGenerator(llama_path, engine="static", track_emissions=False)
    assert answers == reference(PROMPTS[:4], max_new_tokens=6, temperature=0, skip_prompt=True,
                                show_progress_bar=False)


@pytest.mark.parametrize("value", [-1, "soon", True])
def test_fast_engine_after_s_is_checked_before_loading(value):
    with pytest.raises(ValueError, match="fast_engine_after_s"):
        SimpleGenerator("/no/such/model", fast_engine_after_s=value)


def test_vllm_on_a_cpu_compiles_only_for_long_calls():
    from simple_generation.engines.select import vllm_cpu_compile_pays

    vllm = fast_engine_estimates(10**8, "bfloat16", on_gpu=False)[0]
    assert not vllm_cpu_compile_pays(60.0, vllm)
    assert vllm_cpu_compile_pays(100_000.0, vllm)
