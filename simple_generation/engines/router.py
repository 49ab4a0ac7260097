"""Which engine runs a call: the order of preference, fallback, and starting a fast engine.

One :class:`EngineRouter` per generator owns its engines. For each call it

1. picks the first engine of its order that supports every parameter set of the call (an engine that
   does not is skipped, with its reason logged and kept in the call's ``engine_reason``);
2. under ``engine="auto"``, may move a large greedy call to a fast engine (OpenVINO, vLLM: see
   :mod:`.select` for the rule and :mod:`.fast` for the candidates), without starting it yet;
3. starts that fast engine only once the call is known to need it (:meth:`EngineRouter.start`): a rerun
   whose answers are all stored starts nothing; a fast engine that fails to start is dropped for good
   and the call is routed again.

The store keys name the engine *family* (:func:`family_of`), so the pipeline asks for a :class:`Route`
first, computes the keys of its family, looks them up, and only then asks to :meth:`~EngineRouter.start`
it; when the start fails it asks again and recomputes the keys for the new family.

Example:
    >>> order, why = engine_order("auto", is_encoder_decoder=True)
    >>> order, why
    (['static'], 'auto: static batching (encoder-decoder)')
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import NoEngineError
from ..requests import GenerationParams
from . import engine_class
from .base import Engine, EngineContext
from .fast import FastChoice, FastEngines
from .select import JobSize

logger = logging.getLogger("simple_generation")


def family_of(engine: Any) -> str:
    """The engine family in store keys (an engine or an engine class): the HF engines share answers (both
    exact, same model), engines with their own runtime do not."""
    return "hf" if engine.needs_hf_model else engine.name


def hf_auto_order(is_encoder_decoder: bool) -> list[str]:
    """HF engines worth trying for this model, fastest first (each call falls back along the list).

    Continuous batching for causal models: measured 2.57x plain HF batching on varied answer lengths
    (1.65x static sorted batches), identical greedy answers (benchmarks/throughput.py, README).
    """
    return ["static"] if is_encoder_decoder else ["continuous", "static"]


def engine_order(requested: str, is_encoder_decoder: bool, is_vision: bool = False) -> tuple[list[str], str]:
    """(engine names in order of preference, why) for the constructor's ``engine`` argument.

    ``"auto"`` picks among the HF engines, which share the loaded model: continuous batching for causal
    models (falling back to static batching, per call, for what it does not support), static batching
    for encoder-decoders. A named HF engine other than static falls back to static; an engine with its
    own runtime has no fallback.
    """
    if is_vision:  # feature: images: engines that take the prompts' images (static: any; continuous: some types)
        if requested == "auto":
            return ["continuous", "static"], "auto: continuous batching for an image-text model (static batching " \
                                             "where its architecture needs model.generate)"
        if not engine_class(requested).supports_images:
            raise ValueError(f"engine={requested!r} does not run image-text-to-text models yet: use engine='static' "
                             "or 'auto'.")
    if requested == "auto":
        order = hf_auto_order(is_encoder_decoder)
        why = ("continuous batching for a causal model" if order[0] == "continuous"
               else "static batching" + (" (encoder-decoder)" if is_encoder_decoder else ""))
        return order, f"auto: {why}"
    cls = engine_class(requested)
    if is_encoder_decoder and not cls.supports_encoder_decoder:
        raise ValueError(f"engine={requested!r} runs causal (decoder-only) models; this is an encoder-decoder: "
                         "use engine='static' or 'auto'.")
    order = [requested] + (["static"] if cls.needs_hf_model and requested != "static" else [])
    return order, "requested"


def requested_class(requested: str):
    """The engine class named by the constructor's ``engine`` (None for ``"auto"``); ValueError when it
    is unknown or cannot run here (before anything is loaded)."""
    if not isinstance(requested, str):
        raise TypeError(f"engine must be a name such as 'auto', got {requested!r}.")
    if requested == "auto":
        return None
    cls = engine_class(requested)
    problem = cls.available()
    if problem is not None:
        raise ValueError(f"engine={requested!r} cannot run here: {problem}")
    return cls


def split_engine_kwargs(requested: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove from ``kwargs`` (the constructor's extra keywords) and return those meant for the engine:
    the named engine's options (vLLM's ``tensor_parallel_size``...), under ``"auto"`` the continuous
    engine's (``max_slots``, the cache's memory budget)."""
    options = engine_class(requested if requested != "auto" else "continuous")
    return {k: kwargs.pop(k) for k in list(kwargs) if options.accepts_kwarg(k)}


@dataclass(frozen=True)
class Route:
    """The engine a call goes to, as the pipeline sees it before anything is generated.

    ``engine`` is None for a fast engine chosen but not started yet (:meth:`EngineRouter.start` starts it).
    """

    name: str
    family: str                      # names the store keys of the call's answers
    why: str
    engine: Engine | None = None
    pending: FastChoice | None = None


class EngineRouter:
    """The engines of one generator, and which one runs each call.

    Args:
        order: engine names in order of preference; the last one is the fallback every call can use.
        reason: why this order (shown in ``last_run.engine_reason``).
        context: what HF engines are built from (the loaded model, tokenizer, config).
        engine_kwargs: the engine keywords the user gave, for the engine named ``kwargs_for``.
        fast: the fast engines ``"auto"`` may move calls to (None: none).
        engines: engines already built, by name (an engine with its own runtime, started by the façade).

    Example:
        >>> router = EngineRouter.for_model("auto", context)                        # doctest: +SKIP
        >>> route = router.choose([params], job)                                    # doctest: +SKIP
        >>> engine, why = router.start(route, needed=True)                          # doctest: +SKIP
    """

    def __init__(self, order: Sequence[str], reason: str, context: EngineContext | None, *,
                 engine_kwargs: dict[str, Any] | None = None, kwargs_for: str | None = None,
                 fast: FastEngines | None = None, engines: dict[str, Engine] | None = None):
        if not order:
            raise ValueError("an engine router needs at least one engine")
        self.order = list(order)
        self.reason = reason
        self.context = context
        self.engine_kwargs = dict(engine_kwargs or {})
        self.kwargs_for = kwargs_for
        self.fast = fast
        self._engines: dict[str, Engine] = dict(engines or {})

    @classmethod
    def for_model(cls, requested: str, context: EngineContext, *, engine_kwargs: dict[str, Any] | None = None,
                  fast: FastEngines | None = None) -> EngineRouter:
        """The router for an HF model loaded for ``engine=requested`` (``"auto"`` or an HF engine's name)."""
        order, reason = engine_order(requested, context.is_encoder_decoder, context.is_vision)
        kwargs_for = "continuous" if requested == "auto" else requested
        return cls(order, reason, context, engine_kwargs=engine_kwargs, kwargs_for=kwargs_for, fast=fast)

    @classmethod
    def for_engine(cls, engine: Engine) -> EngineRouter:
        """The router of a generator built around one started engine (vLLM, OpenVINO named by the user)."""
        return cls([engine.name], "requested", None, engines={engine.name: engine})

    # ------------------------------------------------------------------ engines
    def engine(self, name: str) -> Engine:
        """The engine ``name`` of this router's order, built once (HF engines share the loaded model)."""
        if name not in self._engines:
            if self.context is None:
                raise ValueError(f"the {name} engine is not one of this generator's engines ({self.order})")
            kwargs = self.engine_kwargs if name == self.kwargs_for else {}
            self._engines[name] = engine_class(name).create(dataclasses.replace(self.context, engine_kwargs=kwargs))
        return self._engines[name]

    @property
    def default(self) -> Engine:
        """The last engine of the order: always there to fall back on (static batching for HF models)."""
        return self.engine(self.order[-1])

    @property
    def preferred(self) -> str:
        """The name of the engine calls go to first."""
        return self.order[0]

    # ------------------------------------------------------------------ per call
    def choose(self, distinct: Sequence[GenerationParams], job: JobSize) -> Route:
        """The route of a call with these parameter sets (one per distinct set) and this size.

        Raises :class:`~simple_generation.errors.NoEngineError` (a ValueError) when no engine of the
        order supports the call.
        """
        if not job.requests:
            engine = self.default
            return Route(engine.name, family_of(engine), self.reason, engine)
        engine, why = self._first_supporting(distinct)
        if self.fast is not None and engine.needs_hf_model:
            fast, why_fast = self.fast.choose(distinct, job)
            if fast is not None:
                logger.info("Engine: auto: %s", why_fast)
                if isinstance(fast, FastChoice):
                    return Route(fast.name, family_of(engine_class(fast.name)), f"auto: {why_fast}", pending=fast)
                return Route(fast.name, family_of(fast), f"auto: {why_fast}", fast)
            if why_fast:
                why = f"{why}; {why_fast}"
        return Route(engine.name, family_of(engine), why, engine)

    def _first_supporting(self, distinct: Sequence[GenerationParams]) -> tuple[Engine, str]:
        """The first engine of the order that supports every parameter set, and why (its fallback logged)."""
        reasons = []
        for name in self.order:
            engine = self.engine(name)
            problems = [p for p in (engine.unsupported(params) for params in distinct) if p]
            if not problems:
                why = self.reason if not reasons else f"{reasons[-1]}; fell back to {name}"
                if reasons:
                    logger.info("Engine: %s", why)
                return engine, why
            reasons.append(f"{name} does not support this call ({problems[0]})")
        raise NoEngineError("No engine supports this call: " + "; ".join(reasons))

    def start(self, route: Route, needed: bool = True) -> tuple[Engine | None, str]:
        """(the engine to run the call on, why), starting a pending fast engine when the call ``needed``
        generation. Nothing needed: the fallback engine, and the fast engine is not started.
        ``(None, why)`` when the fast engine could not start: it is no longer a candidate (one warning,
        logged by :class:`~.fast.FastEngines`); :meth:`choose` again, and recompute the store keys, since
        the family may differ."""
        if route.engine is not None:
            return route.engine, route.why
        if not needed:
            return self.default, f"{route.why} (every answer was stored: {route.name} not started)"
        assert route.pending is not None and self.fast is not None
        started = self.fast.start(route.pending)
        if started is None:
            return None, f"{route.why}; it could not start"
        return started, route.why
