"""Engines: one module each, found by name.

An engine class implements the :class:`~.base.Engine` protocol (capability class attributes, ``create``,
``available``, ``accepts_kwarg``, ``unsupported``, ``configure``, ``run``), usually by subclassing
:class:`~.base.EngineBase`. Which engine runs a call is the :mod:`~.router`'s business.
"""

from __future__ import annotations

import importlib

from .base import Engine, EngineBase, EngineContext, EngineStats

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


__all__ = ["REGISTRY", "Engine", "EngineBase", "EngineContext", "EngineStats", "engine_class"]
