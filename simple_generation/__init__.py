"""simple-generation: batched, ordered, exact text generation over HuggingFace checkpoints.

Names are imported on first use, so ``simple-generation --help`` and usage errors answer without
loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .logs import setup_library_logger

__version__ = "1.0.0"

_EXPORTS = {
    "BatchGenerationError": ".errors",
    "Choice": ".scoring",
    "CompletionOutput": ".results",
    "DefaultGenerationConfig": ".config",
    "DistributedGenerationError": ".errors",
    "GenerationInterrupted": ".errors",
    "GenerationResult": ".results",
    "ImageError": ".errors",
    "ModelLoadError": ".errors",
    "ResultStore": ".store",
    "RunSummary": ".results",
    "SamplingParams": ".sampling_params",
    "Score": ".scoring",
    "SimpleGenerator": ".generator",
    "SimpleVLMGenerator": ".generator",  # feature: images (the original project's name)
    "TokenLogprob": ".results",  # feature: logprobs
    "TopLogprob": ".results",
    "available_system_prompts": ".templates",
    "render_conversation": ".templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'simple_generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .config import DefaultGenerationConfig  # noqa: F401
    from .errors import (  # noqa: F401
        BatchGenerationError,
        DistributedGenerationError,
        GenerationInterrupted,
        ImageError,
        ModelLoadError,
    )
    from .generator import SimpleGenerator, SimpleVLMGenerator  # noqa: F401
    from .results import CompletionOutput, GenerationResult, RunSummary, TokenLogprob, TopLogprob  # noqa: F401
    from .sampling_params import SamplingParams  # noqa: F401
    from .scoring import Choice, Score  # noqa: F401
    from .store import ResultStore  # noqa: F401
    from .templates import available_system_prompts, render_conversation  # noqa: F401

setup_library_logger()
