"""The fast engines ``engine="auto"`` may move a call to: which ones fit the loaded model, and starting them.

The rule (when a call pays for a fast engine) is :func:`~simple_generation.engines.select.pick_fast_engine`;
this module holds the state around it: the candidates found at construction, the engines started on first
use, and the ones that failed to start (dropped with one warning, never raised).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..requests import GenerationParams
from . import engine_class
from .base import EngineContext
from .select import (
    FastEngineEstimate,
    JobSize,
    cpu_threads,
    fast_engine_estimates,
    hf_seconds,
    installed_fast_engines,
    pick_fast_engine,
    vllm_cpu_compile_pays,
)

logger = logging.getLogger("simple_generation")

_LOADING_KEYS = ("revision", "trust_remote_code", "token", "cache_dir")


@dataclass(frozen=True)
class FastChoice:
    """A fast engine chosen for a call but not started yet."""

    name: str
    why: str
    hf_s: float  # the call's estimated HF time (vLLM on a CPU compiles only when it pays)


class FastEngines:
    """Installed fast engines for one loaded HF model, started when a call first pays for one."""

    def __init__(self, candidates: list[FastEngineEstimate], *, parameters: int, after_s: float | None,
                 context: EngineContext):
        self.candidates = candidates
        self.parameters = parameters
        self.after_s = after_s
        self.context = context  # model path, device, tokenizer, config, loading keywords and LoRA for every engine
        self.started: dict[str, Any] = {}
        self.prefix_cache = True

    @property
    def on_gpu(self) -> bool:
        return str(self.context.device).startswith("cuda")

    @classmethod
    def for_model(cls, model, *, placement: str, quantization: str | None, compiled: bool, world_size: int,
                  is_encoder_decoder: bool, model_name_or_path: str, tokenizer, model_kwargs: dict[str, Any],
                  lora_weights: str | None, after_s: float | None, prefix_cache: bool = True) -> FastEngines | None:
        """The fast engines that could take calls of this model as loaded (None when none could);
        ``prefix_cache=False`` (the generator's keyword) is passed on to the one that starts."""
        if after_s == float("inf"):
            return None
        device = str(model.device)
        why_not = None
        if is_encoder_decoder:
            why_not = "an encoder-decoder"
        elif world_size > 1:
            why_not = "several processes (name the engine to run one per process)"
        elif quantization or "gguf_file" in model_kwargs or compiled:
            why_not = "a quantized, GGUF or compiled model"
        elif "device_map over" in placement or not device.startswith(("cpu", "cuda")):
            why_not = f"a model on {placement}"
        if why_not is not None:
            logger.debug("auto: no fast engine for %s", why_not)
            return None
        on_gpu = device.startswith("cuda")
        parameters = int(model.num_parameters())
        dtype = str(model.dtype).replace("torch.", "")
        candidates, skipped = installed_fast_engines(fast_engine_estimates(parameters, dtype, on_gpu))
        for line in skipped:
            logger.debug("auto: fast engine %s", line)
        if not candidates:
            return None
        logger.info("auto: large greedy calls may move to %s (estimated start-up %s s).",
                    " or ".join(c.name for c in candidates), " / ".join(f"{c.startup_s:.0f}" for c in candidates))
        context = EngineContext(
            model_name_or_path=model_name_or_path, tokenizer=tokenizer, config=model.config, is_encoder_decoder=False,
            model_kwargs={"dtype": dtype, **{k: model_kwargs[k] for k in _LOADING_KEYS if k in model_kwargs}},
            lora_weights=lora_weights, device=device)
        fast = cls(candidates, parameters=parameters, after_s=after_s, context=context)
        fast.prefix_cache = prefix_cache
        return fast

    def choose(self, distinct: Sequence[GenerationParams], job: JobSize) -> tuple[Any | None, str]:
        """(the fast engine for this call, or None; why). The engine is the started one when it runs
        already, else a :class:`FastChoice` to :meth:`start` once the call is known to need it (a rerun
        whose answers are all stored starts nothing)."""
        usable = [c for c in self.candidates
                  if all(engine_class(c.name).unsupported_params(p) is None for p in distinct)]
        if not usable:
            return None, ""
        hf_s = hf_seconds(self.parameters, job, self.on_gpu, cpu_threads())
        name, why = pick_fast_engine(job, hf_s, usable, self.after_s)
        if name is None:
            return None, why
        return self.started.get(name) or FastChoice(name, why, hf_s), why

    def start(self, choice: FastChoice):
        """The chosen engine, started; None (one warning, never raised) when it cannot start, and it is
        then no longer a candidate."""
        return self._start(choice.name, choice.hf_s)

    def _start(self, name: str, hf_s: float):
        if name in self.started:
            return self.started[name]
        engine_kwargs: dict[str, Any] = {} if self.prefix_cache else {"prefix_cache": False}
        if name == "vllm" and self.on_gpu:
            import torch

            free, total = torch.cuda.mem_get_info(self.context.device)
            # the HF model stays loaded: give vLLM what is free, less a margin
            engine_kwargs["gpu_memory_utilization"] = round(max(0.05, (free - (1 << 30)) / total), 3)
        elif name == "vllm":
            estimate = next(c for c in self.candidates if c.name == name)
            engine_kwargs["enforce_eager"] = not vllm_cpu_compile_pays(hf_s, estimate)
            logger.info("auto: vLLM on the CPU %s.", "eager (compiling would not pay for this call)"
                        if engine_kwargs["enforce_eager"] else "compiled: the call is long enough to pay for it")
        started = time.perf_counter()
        context = dataclasses.replace(self.context, model_kwargs=dict(self.context.model_kwargs),
                                      engine_kwargs=engine_kwargs)
        try:
            engine = engine_class(name).create(context)
        except Exception as err:  # noqa: BLE001 - any failure to start means: stay on the HF engines
            first_line = str(err).splitlines()[0] if str(err) else ""
            logger.warning("auto: the %s engine could not start (%s: %s); it is no longer used by this generator.",
                           name, type(err).__name__, first_line)
            self.candidates = [c for c in self.candidates if c.name != name]
            return None
        logger.info("auto: started the %s engine in %.1f s.", name, time.perf_counter() - started)
        self.started[name] = engine
        return engine
