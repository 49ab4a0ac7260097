"""Engines: one module each, found by name. See :mod:`simple_generation.engines.base` for the protocol.

An engine class has ``name``, ``needs_hf_model``, ``create(context: EngineContext)`` (classmethod),
``accepts_kwarg(name) -> bool`` (classmethod), ``available() -> str | None`` (classmethod: why it cannot
run here, e.g. its package is missing) and the :class:`~.base.Engine` methods.
"""

from __future__ import annotations

import importlib

from .base import Engine, EngineContext, EngineStats

# name -> "module:Class"; modules are imported only when their engine is asked for
REGISTRY: dict[str, str] = {
    "static": "simple_generation.engines.static:StaticEngine",
    "continuous": "simple_generation.engines.continuous:ContinuousEngine",
    "vllm": "simple_generation.engines.vllm:VLLMEngine",
    "openvino": "simple_generation.engines.openvino:OpenVINOEngine",
}


def engine_class(name: str):
    """The engine class registered under ``name``; ValueError listing the names for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown engine {name!r}: choose one of {', '.join(['auto', *REGISTRY])}.")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["REGISTRY", "Engine", "EngineContext", "EngineStats", "engine_class"]
