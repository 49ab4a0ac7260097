"""OpenVINO engine: the checkpoint exported to OpenVINO IR once (cached on disk), generation by
``openvino_genai.ContinuousBatchingPipeline`` on the CPU, fed our token ids.

Exactness. Greedy answers equal HF's unbatched ``generate`` in fp32 only with f32 everywhere: the IR
weights (``weight_format="fp32"``, the default here; optimum-intel's own default quantizes models over
1B parameters to int8), the compute (``INFERENCE_PRECISION_HINT="f32"``: the CPU plugin otherwise runs
in bf16 on AMX/AVX512-bf16 processors) and the paged KV cache (``KV_CACHE_PRECISION="f32"``: its
default is a low-precision cache, measured to change greedy answers of a tiny Llama within 4 tokens).
``inference_precision="bf16"`` / ``weight_format="int8"`` (or ``"int4"``, ``"fp16"``) trade that for
speed; those answers differ from HF's.

The prompt is already formatted and tokenized by the façade: it goes in as token ids, so OpenVINO's
own chat templating (applied to plain strings by default) never runs. Stop strings are not given to
OpenVINO (that needs its converted tokenizer); post-processing cuts them.

Prefix caching (``SchedulerConfig.enable_prefix_caching``) is on by default; ``prefix_cache=False`` turns it
off. OpenVINO looks a prompt up in its cache only when the request is added, and one ``generate`` call adds all
its requests at once, so the beginnings that several prompts of a call share are computed first (whole 32-token
blocks, one-token requests whose answers are dropped): the requests then reuse them. Greedy f32 answers stay
HF's. OpenVINO GenAI reports no cache hits (``stats.prefix_cached_tokens`` stays 0), and it keeps finished
prompts' blocks for reuse: with the default growing cache (``cache_size=0``) the cache is larger than without.

Sampling draws from OpenVINO's generator seeded with ``request.seed`` (``rng_seed``): reproducible for a
given engine and prompt, but not the same draws as the HF engines' seeded sampler.

Images (image-text-to-text models; LLaVA only, ``_IMAGE_PROMPTS``): the checkpoint is exported for OpenVINO GenAI's
VLM pipeline (``task="image-text-to-text"``, with its converted tokenizer), and every request of such a model, with
images or without, goes in as text plus decoded images (that pipeline takes no token ids): the text is the request's
tokens before the HF processor expanded its image placeholders, decoded, and OpenVINO GenAI preprocesses the images
and expands the placeholders itself. Before a request is added, the tokens OpenVINO GenAI will read are computed
(its expansion, its tokenizer) and must equal the HF processor's; otherwise the request is refused (its error),
never answered from another prompt (:meth:`OpenVINOEngine._vision_prompt`).

Needs the ``openvino``, ``openvino-genai`` and ``optimum-intel`` packages (``scripts/engine-env.sh
openvino`` makes a separate environment with them; optimum-intel pins its own transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..requests import EngineOutput, Request, token_id_list
from .base import EngineBase, EngineContext, EngineStats

logger = logging.getLogger(__name__)

#: keywords of ``SimpleGenerator(...)`` routed to this engine
ENGINE_KWARGS = frozenset({
    "inference_precision",   # "f32" (default, exact) | "bf16" | "f16" | None (the plugin's own default)
    "kv_cache_precision",    # "f32" (default with f32 inference) | "f16" | "bf16" | "u8" | "u4"
    "weight_format",         # "fp32" (default) | "fp16" | "int8" | "int4": the IR's weights
    "ov_cache_dir",          # where exported IR models are kept (default ~/.cache/simple_generation/openvino)
    "ov_config",             # extra OpenVINO CPU plugin properties (dict), e.g. {"INFERENCE_NUM_THREADS": 4}
    "num_threads",           # INFERENCE_NUM_THREADS
    "max_num_seqs",          # scheduler: sequences decoded together (default 256)
    "max_num_batched_tokens",  # scheduler: tokens per step (default 2048: faster than 256 at 135M)
    "cache_size",            # scheduler: KV cache size in GB (0: grow as needed)
    "ov_device",             # OpenVINO device name (default "CPU")
    "prefix_cache",          # scheduler: reuse the KV of shared prompt beginnings (default True)
})

_PRECISIONS = {"f32", "bf16", "f16"}
# OpenVINO GenAI's KV block on CPUs: shared beginnings are computed ahead in whole blocks of it
_BLOCK_TOKENS = 32
_WEIGHT_FORMATS = {"fp32", "fp16", "int8", "int4"}
# feature: images: the model types whose prompts OpenVINO GenAI (2026.4) was checked to read as the HF processor's
# tokens, each with (its image tag, what it writes after each image's expanded tag): for LLaVA it replaces each
# "<image>" by as many "<image>" as the vision encoder gives features, then "\n" (llava/classes.cpp, normalize_prompt)
_IMAGE_PROMPTS = {"llava": ("<image>", "\n")}
# GenerationConfig fields that change answers and that OpenVINO's sampler has no equivalent for
_UNSUPPORTED_FIELDS = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None, "force_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "constraints": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None,
    "renormalize_logits": False, "penalty_alpha": None, "dola_layers": None,
}


def default_cache_dir() -> Path:
    root = os.environ.get("SIMPLE_GENERATION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "simple_generation")
    return Path(root) / "openvino"


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None or dtype == "auto":
        return None
    return str(dtype).replace("torch.", "")


def checkpoint_fingerprint(path_or_id: str, *, revision: str | None = None, extra: dict | None = None) -> str:
    """A key for the exported IR: the checkpoint's identity and content stamps plus the export settings.

    A local folder is keyed by its absolute path and the name, size and modification time of every file
    in it (config, weights, tokenizer); a hub id by the id and the commit its cached config resolves to.
    """
    parts: dict[str, Any] = {"extra": extra or {}}
    local = Path(path_or_id)
    if local.is_dir():
        parts["path"] = str(local.resolve())
        parts["files"] = sorted(
            (str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in local.rglob("*") if f.is_file()
        )
    else:
        parts["id"] = path_or_id
        parts["revision"] = revision
        try:
            from transformers.utils import cached_file

            parts["config"] = str(cached_file(path_or_id, "config.json", revision=revision))
        except Exception:  # offline / unknown id: the export itself will report it
            pass
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("openvino", "optimum-intel", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def _merged_lora_checkpoint(base: str, adapter: str, model_kwargs: dict, into: Path) -> str:
    """Write base + LoRA adapter merged into one plain checkpoint (exact, as peft's merge_and_unload)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **model_kwargs)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(into)
    AutoTokenizer.from_pretrained(base, **model_kwargs).save_pretrained(into)
    return str(into)


def export_ir(path_or_id: str, *, weight_format: str = "fp32", cache_dir: str | os.PathLike | None = None,
              model_kwargs: dict | None = None, lora_weights: str | None = None, vision: bool = False) -> Path:
    """The IR folder for this checkpoint and settings, exported with optimum-intel on first use.

    ``vision``: an image-text-to-text checkpoint, exported for OpenVINO GenAI's VLM pipeline (language model, text
    embeddings, vision embeddings, converted tokenizer, the image processor's settings in
    ``preprocessor_config.json`` where OpenVINO GenAI reads them).

    Exports into a temporary folder beside the cache entry and renames it into place, so concurrent
    processes (``accelerate launch``) never read a half-written model.
    """
    model_kwargs = {k: v for k, v in (model_kwargs or {}).items() if k in ("revision", "trust_remote_code", "token")}
    settings = {"weight_format": weight_format, "lora": None, **_versions(),
                **({"task": "image-text-to-text"} if vision else {}),
                "kwargs": {k: v for k, v in model_kwargs.items() if k != "token"}}
    if lora_weights:
        settings["lora"] = checkpoint_fingerprint(lora_weights)
    key = checkpoint_fingerprint(path_or_id, revision=model_kwargs.get("revision"), extra=settings)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{Path(path_or_id).name or 'model'}-{key}"
    marker = "openvino_language_model.xml" if vision else "openvino_model.xml"
    if (target / marker).is_file():
        logger.info("OpenVINO: using the exported model in %s", target)
        return target
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.intel") is None:
        raise ImportError("The OpenVINO engine exports checkpoints with optimum-intel: pip install optimum-intel "
                          "(in a separate environment, see scripts/engine-env.sh).")
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig, OVWeightQuantizationConfig

    if weight_format in ("fp32", "fp16"):
        ov_config = OVConfig(dtype=weight_format)
    else:
        ov_config = OVConfig(quantization_config=OVWeightQuantizationConfig(bits=8 if weight_format == "int8" else 4))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root, prefix=".export-") as tmp:
        source = path_or_id
        if lora_weights:
            if vision:
                raise ValueError("The openvino engine does not merge LoRA adapters into image-text models.")
            source = _merged_lora_checkpoint(path_or_id, lora_weights, model_kwargs, Path(tmp) / "merged")
            model_kwargs = {"trust_remote_code": model_kwargs.get("trust_remote_code", False)}
        out = Path(tmp) / "ir"
        main_export(model_name_or_path=source, output=out,
                    task="image-text-to-text" if vision else "text-generation-with-past", ov_config=ov_config,
                    convert_tokenizer=vision, **model_kwargs)
        if vision:
            _write_preprocessor_config(out)
        (out / "simple_generation_export.json").write_text(json.dumps(
            {"source": path_or_id, "lora_weights": lora_weights, **settings}, indent=1, default=str))
        try:
            os.replace(out, target)
        except OSError:
            if not (target / marker).is_file():  # not another process winning the race
                shutil.rmtree(target, ignore_errors=True)
                os.replace(out, target)
    logger.info("OpenVINO: exported %s (%s weights) to %s in %.1f s", path_or_id, weight_format, target,
                time.perf_counter() - started)
    return target


def _write_preprocessor_config(folder: Path) -> None:
    """``preprocessor_config.json`` (what OpenVINO GenAI reads the image size, crop and normalization from) from
    ``processor_config.json``'s image processor, where the checkpoint has only the latter (transformers 5 writes
    one file for the whole processor): without it OpenVINO GenAI uses its defaults (336 px) for this model."""
    target = folder / "preprocessor_config.json"
    source = folder / "processor_config.json"
    if target.is_file() or not source.is_file():
        return
    image_processor = json.loads(source.read_text()).get("image_processor")
    if isinstance(image_processor, dict):
        target.write_text(json.dumps(image_processor, indent=1))


class OpenVINOEngine(EngineBase):
    """Requests through an OpenVINO GenAI continuous-batching pipeline, each with its own config."""

    name = "openvino"
    needs_hf_model = False
    unsupported_settings = _UNSUPPORTED_FIELDS
    engine_kwargs = ENGINE_KWARGS
    supports_beam_search = True  # feature: beam search: OpenVINO GenAI's own (GenerationConfig.num_beams)
    # feature: images: OpenVINO GenAI's VLM pipeline (its own image preprocessing and placeholder expansion), for the
    # model types of _IMAGE_PROMPTS; other image-text models are refused when the engine starts
    supports_images = True

    @classmethod
    def unsupported_params(cls, params) -> str | None:
        # feature: logprobs: OpenVINO GenAI gives the chosen token's log-probability only (no alternatives, no
        # prompt's); not wired here: any logprobs request goes to an HF engine under "auto"
        if getattr(params, "logprobs", None) is not None or getattr(params, "prompt_logprobs", None) is not None:
            return ("the openvino engine does not return logprobs (OpenVINO GenAI gives the chosen token's only, "
                    "no alternatives or prompt logprobs): use engine='auto', 'continuous', 'static' or 'vllm'")
        if params.num_beams > 1 and params.sampled:  # feature: beam search
            return ("the openvino engine runs deterministic beam search only (not beam sampling): use the static "
                    "engine")
        constraint = getattr(params, "constraint", None)  # feature: structured output
        if constraint is not None and constraint.kind == "json":
            return ("the openvino engine has no any-JSON constraint (json=True); use json_schema, or "
                    "engine='auto', 'continuous' or 'static'")
        return super().unsupported_params(params)

    @classmethod
    def available(cls) -> str | None:
        for module, package in (("openvino", "openvino"), ("openvino_genai", "openvino-genai")):
            if importlib.util.find_spec(module) is None:
                return f"the {package} package is not installed (see scripts/engine-env.sh openvino)"
        return None

    @classmethod
    def create(cls, context: EngineContext) -> OpenVINOEngine:
        if context.is_encoder_decoder:
            raise ValueError("The OpenVINO engine runs decoder-only (causal LM) models; use engine='auto' or an "
                             "HF engine for encoder-decoders.")
        unknown = set(context.engine_kwargs) - ENGINE_KWARGS
        if unknown:
            raise TypeError(f"Unknown OpenVINO engine arguments: {sorted(unknown)}")
        return cls(context.model_name_or_path, tokenizer=context.tokenizer, config=context.config,
                   model_kwargs=context.model_kwargs, lora_weights=context.lora_weights,
                   vision=context.is_vision, **context.engine_kwargs)

    def __init__(self, model_name_or_path: str, *, tokenizer=None, config=None, model_kwargs: dict | None = None,
                 lora_weights: str | None = None, inference_precision: str | None = "f32",
                 kv_cache_precision: str | None = None, weight_format: str = "fp32",
                 ov_cache_dir: str | os.PathLike | None = None, ov_config: dict | None = None,
                 num_threads: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 cache_size: int = 0, ov_device: str = "CPU", prefix_cache: bool = True, vision: bool = False):
        import openvino_genai

        self.vision = bool(vision)
        model_type = getattr(config, "model_type", None)
        if self.vision and model_type not in _IMAGE_PROMPTS:
            raise ValueError(
                f"The openvino engine runs image-text models of type {sorted(_IMAGE_PROMPTS)} only, not "
                f"{model_type!r}: OpenVINO GenAI preprocesses images and expands their placeholders its own way for "
                "each architecture, and only these were checked to give the HF processor's tokens. Use "
                "engine='static' (or 'vllm').")
        self._genai = openvino_genai
        model_kwargs = dict(model_kwargs or {})
        dtype = _dtype_name(model_kwargs.pop("dtype", None) or model_kwargs.pop("torch_dtype", None))
        if inference_precision == "f32" and dtype in ("bfloat16", "float16"):
            # the user asked for a 16-bit model: run it in 16-bit compute (f32 stays the default otherwise)
            inference_precision = "bf16" if dtype == "bfloat16" else "f16"
        if inference_precision is not None and inference_precision not in _PRECISIONS:
            raise ValueError(f"inference_precision must be one of {sorted(_PRECISIONS)} or None, "
                             f"not {inference_precision!r}")
        if weight_format not in _WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {sorted(_WEIGHT_FORMATS)}, not {weight_format!r}")
        if kv_cache_precision is None and inference_precision == "f32":
            kv_cache_precision = "f32"
        self.tokenizer = tokenizer
        self.config = config
        self.inference_precision = inference_precision
        self.kv_cache_precision = kv_cache_precision
        self.weight_format = weight_format
        self.stats = EngineStats()
        started = time.perf_counter()
        self.model_dir = export_ir(model_name_or_path, weight_format=weight_format, cache_dir=ov_cache_dir,
                                   model_kwargs=model_kwargs, lora_weights=lora_weights, vision=self.vision)
        self.export_seconds = time.perf_counter() - started
        properties: dict[str, Any] = {}
        if inference_precision is not None:
            properties["INFERENCE_PRECISION_HINT"] = inference_precision
        if kv_cache_precision is not None:
            properties["KV_CACHE_PRECISION"] = kv_cache_precision
        if num_threads is not None:
            properties["INFERENCE_NUM_THREADS"] = int(num_threads)
        properties.update(ov_config or {})
        self.properties = properties
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs = int(max_num_seqs)
        scheduler.max_num_batched_tokens = int(max_num_batched_tokens)
        scheduler.cache_size = int(cache_size)
        scheduler.enable_prefix_caching = self.prefix_caching = bool(prefix_cache)
        self.stats.prefix_caching = self.prefix_caching
        self.max_num_seqs = int(max_num_seqs)
        self.chunk_size = 2 * self.max_num_seqs
        started = time.perf_counter()
        if self.vision:  # feature: images: the vision encoder computes in the same precision as the language model
            vision_properties = {k: v for k, v in properties.items() if k != "KV_CACHE_PRECISION"}
            self.pipeline = openvino_genai.ContinuousBatchingPipeline(str(self.model_dir), scheduler, ov_device,
                                                                      properties, {}, vision_properties)
            self._init_vision(model_type)
        else:
            self.pipeline = openvino_genai.ContinuousBatchingPipeline(str(self.model_dir), scheduler, ov_device,
                                                                      properties)
        self.load_seconds = time.perf_counter() - started
        logger.info("OpenVINO: pipeline on %s with %s in %.1f s", ov_device, properties, self.load_seconds)

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        """Per call: fresh counters (``last_run`` shows the call's own); OpenVINO's scheduler keeps its batch size."""
        self.stats = EngineStats(prefix_caching=self.prefix_caching)

    def structured_output_problem(self) -> str | None:
        """Why this pipeline cannot constrain answers (its OpenVINO tokenizer does not expose its vocabulary,
        which OpenVINO GenAI's XGrammar backend needs), or None. (feature: structured output)"""
        if not hasattr(self, "_structured_problem"):
            try:
                empty = len(self.pipeline.get_tokenizer().get_vocab_vector()) == 0
            except Exception:  # noqa: BLE001 - OpenVINO raises when the tokenizer has no vocabulary
                empty = True
            self._structured_problem = (
                "this model's OpenVINO tokenizer does not expose its vocabulary, which OpenVINO GenAI's structured "
                "output needs: use engine='auto', 'continuous' or 'static'") if empty else None
        return self._structured_problem

    # -- parameters ---------------------------------------------------------------------------------
    def generation_config(self, request: Request):
        """OpenVINO's GenerationConfig for one request (its own budget, seed and stop tokens)."""
        hf = request.params.config
        config = self._genai.GenerationConfig()
        config.max_new_tokens = int(request.max_new_tokens)
        eos = token_id_list(hf.eos_token_id)
        if eos:
            config.eos_token_id = eos[0]
            config.stop_token_ids = set(eos)
        else:
            config.ignore_eos = True
        if hf.min_new_tokens:
            config.min_new_tokens = int(hf.min_new_tokens)
        if hf.repetition_penalty not in (None, 1.0):
            config.repetition_penalty = float(hf.repetition_penalty)
        if hf.no_repeat_ngram_size:
            config.no_repeat_ngram_size = int(hf.no_repeat_ngram_size)
        config.num_return_sequences = request.params.num_return_sequences
        config.do_sample = bool(hf.do_sample)
        if request.params.num_beams > 1:  # feature: beam search: HF's settings under OpenVINO's names
            config.num_beams = request.params.num_beams
            config.num_beam_groups = int(getattr(hf, "num_beam_groups", None) or 1)
            config.diversity_penalty = float(getattr(hf, "diversity_penalty", None) or 0.0)
            config.length_penalty = float(hf.length_penalty if hf.length_penalty is not None else 1.0)
            stop = self._genai.StopCriteria
            config.stop_criteria = (stop.EARLY if hf.early_stopping is True
                                    else stop.NEVER if hf.early_stopping == "never" else stop.HEURISTIC)
        if hf.do_sample:
            config.temperature = float(hf.temperature if hf.temperature is not None else 1.0)
            config.top_p = float(hf.top_p if hf.top_p is not None else 1.0)
            if hf.top_k:  # HF: 0/None = no top-k; OpenVINO: its default (no limit)
                config.top_k = int(hf.top_k)
            if getattr(hf, "min_p", None):
                config.min_p = float(hf.min_p)
            if request.seed is not None:
                config.rng_seed = int(request.seed) & 0xFFFFFFFF
        constraint = request.params.constraint
        if constraint is not None:  # feature: structured output: StructuredOutputConfig (XGrammar inside)
            from ..constrained import choices_grammar

            structured = self._genai.StructuredOutputConfig()
            if constraint.kind == "json_schema":
                structured.json_schema = constraint.value
            elif constraint.kind == "regex":
                structured.regex = constraint.value
            elif constraint.kind == "choices":
                structured.grammar = choices_grammar(constraint.choices)
            else:
                structured.grammar = constraint.value
            config.structured_output_config = structured
        return config

    # -- running ------------------------------------------------------------------------------------
    def _input(self, request: Request):
        import numpy as np
        import openvino

        if not request.token_ids:
            raise ValueError(f"request {request.id}: no prompt tokens")
        return openvino.Tensor(np.asarray([request.token_ids], dtype=np.int64))

    def _output(self, result) -> EngineOutput:
        sequences = [[int(t) for t in ids] for ids in result.m_generation_ids]
        reasons = []
        for reason in getattr(result, "finish_reasons", None) or [None] * len(sequences):
            reasons.append("length" if reason == self._genai.GenerationFinishReason.LENGTH
                           else "stop" if reason == self._genai.GenerationFinishReason.STOP else None)
        return EngineOutput(sequences=sequences, finish_reasons=reasons)

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        """Chunks of ``2 * max_num_seqs`` requests, each one ``generate`` call of the continuous-batching
        pipeline (its C++ loop: stepping it from Python measured ~15-25% slower); results stream per chunk."""
        requests = list(requests)
        if any(r.params.constraint is not None for r in requests) and self.structured_output_problem():
            raise ValueError(f"The openvino engine cannot run structured output: {self.structured_output_problem()}.")
        if self.vision:  # feature: images: this pipeline takes text and images, never token ids
            yield from self._run_vision(requests, isolate_errors)
            return
        if self.prefix_caching and len(requests) > 1:
            self._warm_prefix_cache(requests)
        for start in range(0, len(requests), self.chunk_size):
            chunk, inputs, configs = [], [], []
            for request in requests[start:start + self.chunk_size]:
                try:
                    inputs.append(self._input(request))
                    configs.append(self.generation_config(request))
                except Exception as error:
                    if not isolate_errors:
                        raise
                    del inputs[len(chunk):]
                    yield request, EngineOutput(error=f"{type(error).__name__}: {error}")
                    continue
                chunk.append(request)
            if not chunk:
                continue
            try:
                results = self.pipeline.generate(inputs, configs)
            except Exception as error:
                if not isolate_errors:
                    raise
                yield from self._isolate(chunk, error)
                continue
            self.stats.batches += 1
            self.stats.batch_size = min(len(chunk), self.max_num_seqs)
            for request, result in zip(chunk, results):
                yield request, self._output(result)

    def _warm_prefix_cache(self, requests: Sequence[Request]) -> None:
        """Compute each beginning that several requests share once, before the requests themselves.

        OpenVINO GenAI looks a request's prompt up in its prefix cache when the request is added, and a
        ``generate`` call adds all its requests at once: within one call (a chunk here) no request would reuse
        another's beginning. So the shared beginnings (:func:`shared_prefixes`) run first, as one call of
        one-token requests whose answers are dropped; the requests then find those blocks in the cache.
        Costs one extra step; nothing when no two prompts share a whole block (``_BLOCK_TOKENS``)."""
        # whole blocks only: warm-ups ending inside a block (their one new token written there) were measured to
        # leave blocks that changed later answers (15 of 32 prompts, by logit margins far from ties)
        prefixes = shared_prefixes([r.token_ids for r in requests if r.token_ids], _BLOCK_TOKENS)
        if not prefixes:
            return
        import numpy as np
        import openvino

        config = self._genai.GenerationConfig()
        config.max_new_tokens = 1
        config.ignore_eos = True
        started = time.perf_counter()
        try:
            self.pipeline.generate([openvino.Tensor(np.asarray([ids], dtype=np.int64)) for ids in prefixes],
                                   [config] * len(prefixes))
        except Exception as error:  # noqa: BLE001 - only an optimisation: the requests run anyway
            logger.warning("OpenVINO: computing the shared prompt beginnings first failed (%s); going on.", error)
            return
        logger.debug("OpenVINO: %d shared beginnings (%d tokens) cached in %.2f s", len(prefixes),
                     sum(map(len, prefixes)), time.perf_counter() - started)

    def _isolate(self, requests: list[Request], error: Exception) -> Iterator[tuple[Request, EngineOutput]]:
        logger.warning("OpenVINO step failed (%s): retrying %d requests one by one", error, len(requests))
        for request in requests:
            try:
                [result] = self.pipeline.generate([self._input(request)], [self.generation_config(request)])
                yield request, self._output(result)
            except Exception as own_error:
                yield request, EngineOutput(error=f"{type(own_error).__name__}: {own_error}")


    # feature: images ----------------------------------------------------------------------------------------
    def _init_vision(self, model_type: str) -> None:
        """What checking an image request needs: the image tag and what OpenVINO GenAI writes after each expanded
        tag, how many tokens it expands a tag into (the vision encoder's features an image, a static dimension of
        the exported model), its tokenizer and whether that tokenizer adds a BOS token."""
        import openvino

        self.image_tag, self.after_image = _IMAGE_PROMPTS[model_type]
        encoder = openvino.Core().read_model(str(self.model_dir / "openvino_vision_embeddings_model.xml"))
        features = encoder.outputs[0].get_partial_shape()
        if features.rank.is_dynamic or features.rank.get_length() != 3 or features[1].is_dynamic:
            raise ValueError(f"The openvino engine cannot tell how many tokens this model's images take (its exported "
                             f"vision encoder gives features of shape {features}); use engine='static'.")
        self.image_tokens = features[1].get_length()
        self.ov_tokenizer = self.pipeline.get_tokenizer()
        bos = self.ov_tokenizer.get_bos_token_id()
        probe = self.ov_tokenizer.encode("a").input_ids.data[0].tolist()
        self.adds_bos = bos >= 0 and bool(probe) and probe[0] == bos
        self.bos_token_id = bos
        self._handle_ids = 0

    def _vision_prompt(self, request: Request) -> tuple[str, list]:
        """OpenVINO GenAI's input for a request of an image-text model: (text, images as uint8 [1, H, W, 3] tensors).

        The text is the request's tokens before the HF processor expanded its image placeholders, decoded (less the
        BOS that OpenVINO's tokenizer adds again), less what OpenVINO GenAI writes after each image itself. The tokens
        OpenVINO GenAI will make of it (each tag expanded as it does, its tokenizer) must equal ``request.token_ids``
        (the HF processor's): ValueError otherwise, as the answer would be to another prompt. The images are decoded
        here, when the request is added (an ImageError when one is gone or changed)."""
        import numpy as np
        import openvino

        count = request.media.count if request.media is not None else 0
        ids = list(request.media.placeholder_ids) if count else list(request.token_ids)
        if not ids:
            raise ValueError(f"request {request.id}: no prompt tokens")
        if self.adds_bos and ids[0] == self.bos_token_id:
            ids = ids[1:]
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if count:
            text = text.replace(self.image_tag + self.after_image, self.image_tag)
            read = text.replace(self.image_tag, self.image_tag * self.image_tokens + self.after_image)
        else:
            read = text
        tokens = self.ov_tokenizer.encode(read).input_ids.data[0].tolist()
        if tokens != list(request.token_ids) or text.count(self.image_tag) != count:
            raise ValueError(
                f"OpenVINO GenAI would read this prompt as {len(tokens)} tokens, the HF processor made "
                f"{len(request.token_ids)} (other tokens): its answer would not be the model's; use engine='static'")
        if not count:
            return text, []
        from transformers.image_transforms import convert_to_rgb

        images = [openvino.Tensor(np.ascontiguousarray(np.asarray(convert_to_rgb(image), dtype=np.uint8)[None]))
                  for image in request.media.images()]
        return text, images

    def _add_vision(self, request: Request):
        text, images = self._vision_prompt(request)
        config = self.generation_config(request)
        config.apply_chat_template = False  # the prompt is formatted already
        self._handle_ids += 1
        return self.pipeline.add_request(self._handle_ids, text, images, config)

    def _steps(self) -> None:
        while self.pipeline.has_non_finished_requests():
            self.pipeline.step()

    def _handle_output(self, handle) -> EngineOutput:
        outputs = handle.read_all()
        reasons = [("length" if o.finish_reason == self._genai.GenerationFinishReason.LENGTH
                    else "stop" if o.finish_reason == self._genai.GenerationFinishReason.STOP else None)
                   for o in outputs]
        return EngineOutput(sequences=[[int(t) for t in o.generated_ids] for o in outputs], finish_reasons=reasons)

    def _run_vision(self, requests: Sequence[Request], isolate_errors: bool
                    ) -> Iterator[tuple[Request, EngineOutput]]:
        """Chunks of ``max_num_seqs`` requests added to the pipeline (each one's images decoded and encoded then),
        stepped until all finish. A request that cannot be added (its images gone, its prompt read otherwise than
        HF's) is its own error under ``isolate_errors``."""
        for start in range(0, len(requests), self.max_num_seqs):
            added = []
            for request in requests[start:start + self.max_num_seqs]:
                try:
                    added.append((request, self._add_vision(request)))
                except Exception as error:
                    if not isolate_errors:
                        raise
                    yield request, EngineOutput(error=f"{type(error).__name__}: {error}")
            if not added:
                continue
            try:
                self._steps()
            except Exception as error:
                if not isolate_errors:
                    raise
                logger.warning("OpenVINO step failed (%s): retrying %d requests one by one", error, len(added))
                for request, _ in added:
                    try:
                        handle = self._add_vision(request)
                        self._steps()
                        yield request, self._handle_output(handle)
                    except Exception as own_error:
                        yield request, EngineOutput(error=f"{type(own_error).__name__}: {own_error}")
                continue
            self.stats.batches += 1
            self.stats.batch_size = len(added)
            for request, handle in added:
                yield request, self._handle_output(handle)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common beginning of two token lists (binary search over C-speed slice comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def shared_prefixes(token_lists: Sequence[Sequence[int]], block: int) -> list[list[int]]:
    """The longest beginnings that two or more of ``token_lists`` share, cut to whole blocks of ``block``
    tokens (at least one); a beginning that begins another is dropped, as each is computed only once.

    Neighbours in sorted order give every longest shared beginning; in sorted order what a beginning begins
    comes right after it.

    Example:
        >>> shared_prefixes([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 9], [7, 8]], 2)
        [[1, 2, 3, 4]]
        >>> shared_prefixes([[1, 2, 3], [1, 2, 4], [5, 6, 7], [5, 6, 8]], 2)
        [[1, 2], [5, 6]]
        >>> shared_prefixes([[1, 2], [3, 4]], 1)
        []
    """
    ordered = sorted(list(ids) for ids in token_lists)
    found = sorted({tuple(a[:n]) for a, b in zip(ordered, ordered[1:])
                    if (n := _common_length(a, b) // block * block) > 0})
    return [list(prefix) for prefix, following in zip(found, found[1:] + [()])
            if following[:len(prefix)] != prefix]
