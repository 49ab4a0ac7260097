"""How ``engine="auto"`` picks an engine, and how the façade builds engines (one module per engine)."""

from __future__ import annotations

import importlib.util
import logging

from . import REGISTRY, engine_class

logger = logging.getLogger("simple_generation")


# "auto" prefers continuous batching for causal models: measured 2.57x plain HF batching on varied answer
# lengths (1.65x static sorted batches), identical greedy answers (benchmarks/throughput.py, README).
AUTO_CONTINUOUS = True


def hf_auto_order(is_encoder_decoder: bool) -> list[str]:
    """HF engines worth trying for this model, fastest first (each call falls back along the list)."""
    if AUTO_CONTINUOUS and not is_encoder_decoder \
            and importlib.util.find_spec("simple_generation.engines.continuous") is not None:
        return ["continuous", "static"]
    return ["static"]


def choose_engine(requested: str, is_encoder_decoder: bool) -> tuple[list[str], str]:
    """(engine names in order of preference, why) for the constructor's ``engine`` argument.

    ``"auto"`` picks among the HF engines, which share the loaded model: continuous batching for
    causal models (falling back to static batching, per call, for what it does not support), static
    batching for encoder-decoders. vLLM and OpenVINO load their own runtime and are used when asked
    for by name (their start-up costs minutes on a CPU, which only pays for large jobs).
    """
    if requested == "auto":
        order = hf_auto_order(is_encoder_decoder)
        why = ("continuous batching for a causal model" if order[0] == "continuous"
               else "static batching" + (" (encoder-decoder)" if is_encoder_decoder else ""))
        return order, f"auto: {why}"
    if requested not in REGISTRY:
        engine_class(requested)  # raises with the list of names
    cls = engine_class(requested)
    problem = cls.available()
    if problem is not None:
        raise ValueError(f"engine={requested!r} cannot run here: {problem}")
    if requested == "continuous" and is_encoder_decoder:
        raise ValueError("engine='continuous' runs causal (decoder-only) models; this is an encoder-decoder: use "
                         "engine='static' or 'auto'.")
    order = [requested] + (["static"] if requested == "continuous" else [])
    return order, "requested"
