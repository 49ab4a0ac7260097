"""The protocol every engine implements, and the statistics it keeps.

An engine takes :class:`~simple_generation.requests.Request` objects and yields
``(request, EngineOutput)`` pairs as each request finishes, in completion order. It knows its
model/runtime and token ids; never templates, the store, files or decoding. Adding an engine is
adding one module under ``simple_generation/engines/`` and one line in its registry
(:mod:`simple_generation.engines`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

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


@dataclass
class EngineStats:
    """Counters an engine updates while it runs (read after the stream ends)."""

    batches: int = 0             # static: batches run; continuous: prefill batches (admissions)
    batch_size: int = 0          # the (last) batch size / number of slots used
    oom_retries: int = 0
    forward_passes: int = 0      # continuous: prefills and decoding steps (0 where the engine does not count them)
    peak_rows: int = 0           # continuous: the most rows decoded together
    peak_cache_bytes: int = 0    # continuous: the largest KV cache allocated
    prefix_caching: bool | None = None   # whether the engine reused KV of shared prompt prefixes (None: it cannot)
    prompt_tokens: int = 0       # prompt tokens prefilled or reused (0 where the engine does not count them)
    prefix_cached_tokens: int = 0  # of those, tokens whose KV came from the prefix cache


@runtime_checkable
class Engine(Protocol):
    """Requests in, finished outputs out; what every engine class provides.

    Class attributes say what the engine is and can do (as ``llm``'s ``Model`` does), so the router can
    rule an engine out before starting it: ``name`` (its registry name), ``needs_hf_model`` (the façade
    loads the transformers model for it; engines with their own runtime load from the path),
    ``supports_encoder_decoder``, ``supports_beam_search`` (``num_beams > 1``, group beam search),
    ``supports_generate_kwargs`` (``model.generate`` arguments such as logits processors or streamers;
    the tokenizer the façade adds for stop strings is always fine) and ``unsupported_settings``
    (``GenerationConfig`` fields it has no equivalent of, each with its neutral value); ``supports_images``
    (requests of image-text models carry ``media``: :class:`~simple_generation.vision.PromptMedia`).

    ``run`` must yield every request exactly once. Out-of-memory is the engine's to handle (shrink
    and retry; never drop finished work). Any other failure: with ``isolate_errors=False`` raise
    (what was already yielded is kept by the caller); with ``isolate_errors=True`` narrow it down to
    the requests that fail on their own and yield those with ``EngineOutput(error=...)``.

    Example:
        >>> from simple_generation.engines import engine_class
        >>> cls = engine_class("static")
        >>> cls.name, cls.needs_hf_model, cls.supports_beam_search
        ('static', True, True)
    """

    name: ClassVar[str]
    needs_hf_model: ClassVar[bool]
    supports_encoder_decoder: ClassVar[bool]
    supports_beam_search: ClassVar[bool]
    supports_generate_kwargs: ClassVar[bool]
    supports_images: ClassVar[bool]
    unsupported_settings: ClassVar[Mapping[str, Any]]
    stats: EngineStats

    @classmethod
    def create(cls, context: EngineContext) -> Engine:
        """The engine, built from what the façade knows (raises when it cannot start)."""

    @classmethod
    def available(cls) -> str | None:
        """Why this engine cannot run here (its package is missing...), or None when it can."""

    @classmethod
    def accepts_kwarg(cls, name: str) -> bool:
        """Whether the constructor keyword ``name`` is one of this engine's own options."""

    @classmethod
    def unsupported_params(cls, params: GenerationParams) -> str | None:
        """Why any engine of this class cannot run these parameters, whatever the model (None when it can)."""

    def unsupported(self, params: GenerationParams) -> str | None:
        """Why this engine, with its model, cannot run requests with these parameters (None when it can)."""

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        """Per call: the batch size to start from, whether it was chosen automatically (out-of-memory may
        lower it), whether to batch prompts of similar length together. A no-op where meaningless."""

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        """Yield ``(request, output)`` for every request as it finishes."""


# what a GenerationConfig setting does, for the messages of engines that lack it
_SETTING_NAMES = {
    "assistant_model": "assisted generation", "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "penalty_alpha": "contrastive search", "dola_layers": "DoLa decoding", "constraints": "constrained beam search",
    "force_words_ids": "constrained beam search", "watermarking_config": "watermarking",
    "guidance_scale": "classifier-free guidance",
}


class EngineBase:
    """Defaults for the :class:`Engine` protocol: engines subclass it, set their class attributes and
    override what differs. The defaults describe the least capable engine (causal models only, no beam
    search, no ``generate()`` arguments, no engine keywords)."""

    name: ClassVar[str] = ""
    needs_hf_model: ClassVar[bool] = True
    supports_encoder_decoder: ClassVar[bool] = False
    supports_beam_search: ClassVar[bool] = False
    supports_generate_kwargs: ClassVar[bool] = False
    supports_images: ClassVar[bool] = False
    unsupported_settings: ClassVar[Mapping[str, Any]] = {}
    engine_kwargs: ClassVar[frozenset[str]] = frozenset()  # the constructor keywords meant for this engine
    stats: EngineStats

    @classmethod
    def create(cls, context: EngineContext) -> EngineBase:
        raise NotImplementedError(f"the {cls.name} engine does not implement create()")

    @classmethod
    def available(cls) -> str | None:
        return None

    @classmethod
    def accepts_kwarg(cls, name: str) -> bool:
        return name in cls.engine_kwargs

    @classmethod
    def unsupported_params(cls, params: GenerationParams) -> str | None:
        """The capability flags checked against ``params``."""
        if not cls.supports_generate_kwargs:
            extra = sorted(k for k, v in params.call_kwargs.items() if k != "tokenizer" and v is not None)
            if extra:
                return (f"the {cls.name} engine cannot take model.generate() arguments ({', '.join(extra)}): "
                        "use the static engine")
        if not cls.supports_beam_search:
            if params.num_beams > 1:
                return (f"the {cls.name} engine does not run beam search (num_beams={params.num_beams}): use the "
                        "static engine")
            if getattr(params.config, "num_beam_groups", 1) not in (None, 1):
                return f"the {cls.name} engine does not run group beam search: use the static engine"
        for name, neutral in cls.unsupported_settings.items():
            value = getattr(params.config, name, None)
            if value is not None and value != neutral:
                what = _SETTING_NAMES.get(name, "the generation setting")
                return f"the {cls.name} engine does not support {what} ({name}={value!r})"
        return None

    def unsupported(self, params: GenerationParams) -> str | None:
        reason = self.unsupported_params(params)
        if reason is None and getattr(params, "constraint", None) is not None:  # feature: structured output
            reason = self.structured_output_problem()
        return reason

    def structured_output_problem(self) -> str | None:
        """Why this engine, as started, cannot constrain answers (None: it can, or the class decides alone)."""
        return None

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        return None

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        raise NotImplementedError(f"the {self.name} engine does not implement run()")


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
    is_vision: bool = False  # an image-text-to-text model (prompts may carry images)
