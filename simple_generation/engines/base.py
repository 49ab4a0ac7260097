"""The protocol every engine implements, and the statistics it keeps.

An engine takes :class:`~simple_generation.requests.Request` objects and yields
``(request, EngineOutput)`` pairs as each request finishes, in completion order. It knows its
model/runtime and token ids; never templates, the store, files or decoding. Adding an engine is
adding one module under ``simple_generation/engines/`` and one line in its registry
(:mod:`simple_generation.engines`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..requests import EngineOutput, GenerationParams, Request


def input_device(model) -> Any:
    """Where a model's inputs go: its input embeddings' device (the first layer's, with a device_map)."""
    import torch

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return model.device
    # accelerate's offload hooks run the layer elsewhere than where its (meta) weights sit
    hook = getattr(embeddings, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)
    device = embeddings.weight.device
    return device if device.type != "meta" else torch.device("cpu")


def runtime_unsupported(params: GenerationParams, engine: str, unsupported_fields: dict[str, Any]) -> str | None:
    """What engines with their own runtime (vLLM, OpenVINO) share: no ``generate()`` arguments (the
    tokenizer the façade adds for stop strings aside: they are cut afterwards), no HF beam search, no
    HF-only generation settings (``unsupported_fields`` maps each to its neutral value)."""
    extra = sorted(k for k in params.call_kwargs if k != "tokenizer")
    if extra:
        return f"the {engine} engine cannot take generate() arguments {extra} (logits processors, streamers...): " \
               "use an HF engine"
    if params.num_beams > 1:
        return f"the {engine} engine does not run HF-style beam search: use an HF engine for num_beams > 1"
    for name, neutral in unsupported_fields.items():
        value = getattr(params.config, name, neutral)
        if value is not None and value != neutral:
            return f"the {engine} engine has no equivalent of the generation setting {name}={value!r}"
    return None


@dataclass
class EngineStats:
    """Counters an engine updates while it runs (read after the stream ends)."""

    batches: int = 0             # static: batches run; continuous: prefill batches (admissions)
    batch_size: int = 0          # the (last) batch size / number of slots used
    oom_retries: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0      # continuous: prefills and decoding steps (0 where the engine does not count them)
    peak_rows: int = 0           # continuous: the most rows decoded together
    peak_cache_bytes: int = 0    # continuous: the largest KV cache allocated


@runtime_checkable
class Engine(Protocol):
    """Requests in, finished outputs out.

    ``run`` must yield every request exactly once. Out-of-memory is the engine's to handle (shrink
    and retry; never drop finished work). Any other failure: with ``isolate_errors=False`` raise
    (what was already yielded is kept by the caller); with ``isolate_errors=True`` narrow it down to
    the requests that fail on their own and yield those with ``EngineOutput(error=...)``.
    """

    name: str
    stats: EngineStats
    needs_hf_model: bool  # class attribute: whether the façade must load the HF model for it

    def unsupported(self, params: GenerationParams) -> str | None:
        """Why this engine cannot run requests with these parameters (None when it can)."""

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        """Yield ``(request, output)`` for every request as it finishes."""


@dataclass
class EngineContext:
    """What the façade hands an engine class to build an engine (``EngineClass.create(context)``).

    HF engines (``needs_hf_model = True`` on the class) get the loaded ``model``; engines with their
    own runtime (vLLM, OpenVINO) get ``model=None`` and load from ``model_name_or_path`` themselves,
    with the user's loading keywords in ``model_kwargs`` (``dtype``, ``revision``,
    ``trust_remote_code``...) and the keywords meant for the engine in ``engine_kwargs`` (those for
    which the class's ``accepts_kwarg(name)`` is true, e.g. vLLM's ``tensor_parallel_size``).
    """

    model_name_or_path: str
    tokenizer: Any
    config: Any
    is_encoder_decoder: bool
    model: Any | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    lora_weights: str | None = None
    device: str | None = None
