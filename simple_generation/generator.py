"""The ``SimpleGenerator`` façade: load once, then generate for lists of prompts."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import DefaultGenerationConfig
from .constrained import model_vocab_size  # feature: structured output
from .conversation import Conversation
from .distributed import current_distribution
from .emissions import track_emissions as emissions_tracker
from .engines import EngineContext
from .engines.fast import FastEngines
from .engines.router import EngineRouter, family_of, requested_class, split_engine_kwargs
from .errors import BatchFailed
from .formatting import PromptFormatter, validate_inputs
from .identity import model_identity
from .loading import LoadOptions, context_length, load_config, load_for_generation, load_tokenizer
from .memory import PeakMemory
from .params import ParamsBuilder
from .pipeline import (
    echo_ready,
    fan_out,
    interrupted,
    plan_call,
    raise_failed,
    run_local,
    summarize,
)
from .postprocess import PostProcessor, resolve_reasoning_markers, special_marker_tokens
from .results import GenerationResult, RunSummary
from .sampling_params import value_of
from .scheduling import resolve_batch_size
from .scoring import Choice, Score, choose_from, score_pairs
from .store import ResultStore
from .templates import Template, get_template

logger = logging.getLogger("simple_generation")

class SimpleGenerator:
    """Load a HuggingFace checkpoint once and generate for lists of prompts, batched and in order.

    Any keyword not listed here goes to ``from_pretrained`` (``dtype``/``torch_dtype``, ``device_map``,
    ``trust_remote_code``, ``revision``, ...).

    Example:
        >>> from simple_generation import SimpleGenerator
        >>> gen = SimpleGenerator("gpt2")                                          # doctest: +SKIP
        >>> gen(["Hello, my name is"], max_new_tokens=8, temperature=0)           # doctest: +SKIP
        ['Hello, my name is ...']

    Args:
        model_name_or_path: hub id or local folder of an ``AutoModelForCausalLM``,
            ``AutoModelForSeq2SeqLM`` or ``AutoModelForImageTextToText`` checkpoint (the last take images:
            ``gen(prompts, images=[...])``, see the README's Images).
        tokenizer_name_or_path: where the tokenizer lives, when not beside the model.
        device: move the model there (``"cuda:1"``, ``"cpu"``, ...). With neither ``device`` nor
            ``device_map``, one GPU when the model fits, ``device_map="auto"`` when it does not, else the CPU.
        lora_weights: a PEFT LoRA adapter (folder or hub id), merged into the weights unless
            ``merge_lora=False`` or the model is quantized.
        compile_model: static KV cache and ``torch.compile`` of the decoding step.
        use_bettertransformer: use the fastest attention kernel available (SDPA or FlashAttention 2).
        system_prompt: a named template (see ``available_system_prompts()``); ``system_prompts`` also works.
        system_message: the system message for the template (named or the tokenizer's).
        apply_chat_template: format prompts with the tokenizer's own chat template.
        add_generation_prompt: end a chat-template prompt with the assistant's opening (default True).
        track_emissions: append a row per call to ``<emissions_dir>/emissions.csv`` (codecarbon).
        generation_defaults: replaces :class:`DefaultGenerationConfig` for every call.
        engine: "auto" (default), "static", "continuous", "vllm" or "openvino"; see the README's Engines.
        fast_engine_after_s: with ``engine="auto"``, move a greedy call to an installed fast engine
            (OpenVINO, vLLM) whenever the call's estimated time on the HF engines is at least this many
            seconds (0: always; ``float("inf")``: never). Default None: when the fast engine's start-up
            plus its time at least halves the estimate (see the README's Engines).
        reasoning_markers: ``"auto"`` (default: ``("<think>", "</think>")`` when the tokenizer's chat template
            or vocabulary has them, as Qwen3's and DeepSeek-R1's do, else off), None (off) or an
            ``(opening, closing)`` pair: each answer's reasoning block goes to ``result.reasoning`` and the text
            keeps the answer after it (see the README's Reasoning models). A call may pass its own.
        allow_remote_images: image-text models: fetch ``http(s)://`` image URLs (off by default: no network).
        **model_kwargs: for ``from_pretrained`` (or the engine's own options, e.g. vLLM's
            ``tensor_parallel_size``); ``load_in_8bit``/``load_in_4bit`` become a
            ``BitsAndBytesConfig``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        lora_weights: str | None = None,
        merge_lora: bool = True,
        compile_model: bool = False,
        use_bettertransformer: bool = False,
        system_prompt: str | Template | None = None,
        system_message: str | None = None,
        apply_chat_template: bool = False,
        add_generation_prompt: bool = True,
        track_emissions: bool = True,
        emissions_dir: str = ".",
        generation_defaults: DefaultGenerationConfig | None = None,
        engine: str = "auto",
        fast_engine_after_s: float | None = None,
        reasoning_markers: str | tuple[str, str] | None = "auto",
        allow_remote_images: bool = False,
        **model_kwargs: Any,
    ):
        if "system_prompts" in model_kwargs:  # the original README's spelling
            if system_prompt is not None:
                raise ValueError("Pass either `system_prompt` or `system_prompts`, not both.")
            system_prompt = model_kwargs.pop("system_prompts")
        if isinstance(system_prompt, str):
            system_prompt = get_template(system_prompt)  # an unknown name fails before the model loads
        cls = requested_class(engine)  # None for "auto"; an unknown or uninstalled engine fails here
        self.distribution = current_distribution()
        self.model_name_or_path = str(model_name_or_path)
        runtime_engine = cls is not None and not cls.needs_hf_model  # its own runtime: no HF model to load
        # the engine's own options (vLLM's tensor_parallel_size, the continuous engine's max_slots...)
        engine_kwargs = split_engine_kwargs(engine, model_kwargs)
        if fast_engine_after_s is not None and (not isinstance(fast_engine_after_s, (int, float))
                                                or isinstance(fast_engine_after_s, bool) or fast_engine_after_s < 0):
            raise ValueError(f"fast_engine_after_s must be a number of seconds >= 0 (or None), got "
                             f"{fast_engine_after_s!r}.")
        self.processor = None
        self.vision = None  # feature: images: image-text-to-text models (see vision.py)
        if runtime_engine:
            config = load_config(model_name_or_path, **model_kwargs)
            from .vision import is_vision_config

            runtime_vision = is_vision_config(config)
            if runtime_vision and not cls.supports_images:
                raise ValueError(f"engine={engine!r} does not run image-text-to-text models here yet: use "
                                 "engine='static' or 'auto'.")
            self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            tokenizer_kwargs = {k: model_kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir")
                                if k in model_kwargs}
            self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                                            padding_side="right" if self.is_encoder_decoder else "left",
                                            **tokenizer_kwargs)
            if runtime_vision:  # the engine takes the images; prompts are still formatted and keyed here
                from .loading import load_processor

                self.processor = load_processor(tokenizer_name_or_path or model_name_or_path, self.tokenizer,
                                                **tokenizer_kwargs)
            self.model = None
            self.config = config
            self.placement = engine
            self.compile_model = False
            model_generation_config = _generation_config_of(model_name_or_path, config, model_kwargs)
            self.engine = cls.create(EngineContext(
                model_name_or_path=self.model_name_or_path, tokenizer=self.tokenizer, config=config,
                is_encoder_decoder=self.is_encoder_decoder, model=None, model_kwargs=dict(model_kwargs),
                engine_kwargs=engine_kwargs, lora_weights=lora_weights, device=str(device) if device else None,
                is_vision=runtime_vision))
            self.router = EngineRouter.for_engine(self.engine)
            dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
            quantization = None
            logger.info("Loaded %s with the %s engine.", model_name_or_path, engine)
        else:
            loaded = load_for_generation(
                model_name_or_path,
                tokenizer_name_or_path=tokenizer_name_or_path,
                device=self.distribution.load_device(device, "device_map" in model_kwargs),
                options=LoadOptions(lora_weights, merge_lora, compile_model, use_bettertransformer,
                                    own_keywords=_own_keywords()),
                **model_kwargs,
            )
            self.model = loaded.model
            self.tokenizer = loaded.tokenizer
            self.config = self.model.config
            self.is_encoder_decoder = loaded.is_encoder_decoder
            self.placement = loaded.placement
            self.compile_model = loaded.compiled
            self._first_call_logged = False
            model_generation_config = self.model.generation_config
            dtype = self.model.dtype
            quantization = loaded.quantization
            self.processor = loaded.processor
            fast = None  # the fast engines "auto" may move calls to (engines/fast.py)
            if engine == "auto" and self.processor is None:
                fast = FastEngines.for_model(
                    self.model, placement=loaded.placement, quantization=loaded.quantization, compiled=loaded.compiled,
                    world_size=self.distribution.world_size, is_encoder_decoder=self.is_encoder_decoder,
                    model_name_or_path=self.model_name_or_path, tokenizer=self.tokenizer, model_kwargs=model_kwargs,
                    lora_weights=lora_weights, after_s=fast_engine_after_s,
                    prefix_cache=engine_kwargs.get("prefix_cache", True))
            self.router = EngineRouter.for_model(engine, EngineContext(
                model_name_or_path=self.model_name_or_path, tokenizer=self.tokenizer, config=self.config,
                is_encoder_decoder=self.is_encoder_decoder, model=self.model, is_vision=self.processor is not None),
                engine_kwargs=engine_kwargs, fast=fast)
            self.engine = self.router.default  # static: always there to fall back on
            logger.info(
                "Loaded %s: %s, dtype %s, on %s (%s); LoRA: %s; quantization: %s; compiled: %s; attention: %s; "
                "engine: %s (%s).",
                model_name_or_path, type(self.model).__name__, self.model.dtype, loaded.placement,
                loaded.placement_reason, loaded.lora or "none", loaded.quantization or "none",
                "yes (static KV cache)" if loaded.compiled else "no", loaded.attention or "default",
                self.router.preferred, self.router.reason,
            )
        if self.processor is not None:  # feature: images: the processor's side of image-text models
            from .vision import VisionInputs

            self.vision = VisionInputs(self.processor, self.config, allow_remote=allow_remote_images)
        if self.vision is not None and system_prompt is not None:
            raise ValueError("system_prompt names a text template, which does not know where this image-text model's "
                             "image tokens go: drop it (the processor's chat template places them; system_message= "
                             "still works).")
        self.engine_name = self.router.preferred
        self.engine_reason = self.router.reason
        self.formatter = PromptFormatter(
            self.tokenizer, template=system_prompt, system_message=system_message,
            apply_chat_template=apply_chat_template, add_generation_prompt=add_generation_prompt, vision=self.vision,
        )
        self.track_emissions = track_emissions
        self.emissions_dir = emissions_dir
        # feature: reasoning: the model's markers; special-token markers are written out when decoding, so the
        # stored (raw) text keeps the block and any markers can split it later
        self.reasoning_markers = resolve_reasoning_markers(reasoning_markers, self.tokenizer)
        self._shown_special = special_marker_tokens(self.tokenizer, self.reasoning_markers)
        self.defaults = generation_defaults or DefaultGenerationConfig()
        self._model_generation_config = model_generation_config
        self.context_length = context_length(self.config)
        self._forward_params = set(inspect.signature(self.model.forward).parameters) if self.model is not None \
            else set()
        self._identity_of = functools.partial(model_identity, self.model_name_or_path, tokenizer_name_or_path,
                                              self.config, lora_weights, dtype, quantization,
                                              model_kwargs=model_kwargs)
        self._identities: dict[str, str] = {}
        self.model_identity = self._identity(family_of(self.engine))
        self.last_run = RunSummary()

    # ------------------------------------------------------------------ engines
    def _identity(self, family: str) -> str:
        """The model identity in store keys for answers of this engine family ("hf", "vllm", "openvino")."""
        if family not in self._identities:  # once per family (files are hashed once, then cached)
            identity = self._identity_of(family=family)
            if self._shown_special:  # feature: reasoning: special markers written out change the stored text
                identity = json.dumps({**json.loads(identity), "shown_special": sorted(self._shown_special.values())},
                                      sort_keys=True)
            self._identities[family] = identity
        return self._identities[family]

    # ------------------------------------------------------------------ inputs
    def _formatter_for_call(self, generation_kwargs: dict[str, Any]) -> PromptFormatter:
        """The constructor's formatter, or one with this call's ``apply_chat_template``/``add_generation_prompt``.

        The original API took both at call time; ``num_workers`` (its DataLoader workers) has no use here.
        ``plain_prompts=True``: string prompts are fed as they are (no named template, no chat template), as
        OpenAI ``/v1/completions`` requests are.
        """
        generation_kwargs.pop("num_workers", None)
        if generation_kwargs.pop("plain_prompts", False):
            current = self.formatter
            if current.template is None and not current.apply_chat_template:
                return current
            return PromptFormatter(self.tokenizer, vision=self.vision)
        options = {k: generation_kwargs.pop(k) for k in ("apply_chat_template", "add_generation_prompt")
                   if k in generation_kwargs}
        if not options:
            return self.formatter
        current = self.formatter
        return PromptFormatter(
            self.tokenizer, template=current.template, system_message=current.system_message,
            apply_chat_template=options.get("apply_chat_template", current.apply_chat_template),
            add_generation_prompt=options.get("add_generation_prompt", current.add_generation_prompt),
            vision=self.vision,
        )

    def _reasoning_for_call(self, generation_kwargs: dict[str, Any]) -> tuple[str, str] | None:
        """The call's ``reasoning_markers`` (popped; default: the generator's). Not a generation parameter: the
        split is made on the raw text as answers leave the pipeline, so it never changes a store key."""
        if "reasoning_markers" not in generation_kwargs:
            return self.reasoning_markers
        markers = resolve_reasoning_markers(generation_kwargs.pop("reasoning_markers"), self.tokenizer)
        hidden = set(special_marker_tokens(self.tokenizer, markers).values()) - set(self._shown_special.values())
        if hidden:
            raise ValueError(f"reasoning_markers {markers!r}: {sorted(hidden)} are special tokens of this tokenizer, "
                             "dropped from decoded text unless the generator writes them out: pass them to "
                             "SimpleGenerator(..., reasoning_markers=...) instead of to the call.")
        return markers

    def _start_empty_prompts(self, token_ids: list[list[int]]) -> list[list[int]]:
        """A prompt with no tokens starts from BOS, as ``model.generate()`` without inputs does."""
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if not empty:
            return token_ids
        bos = _first_token_id(self._model_generation_config.bos_token_id) \
            if self._model_generation_config is not None else None
        if bos is None:
            bos = self.tokenizer.bos_token_id
        if bos is None or self.is_encoder_decoder:
            raise ValueError(
                f"Prompt {empty[0]} is empty after tokenization ({len(empty)} such prompt(s)) and "
                + ("an encoder-decoder needs encoder input" if self.is_encoder_decoder
                   else "the model has no BOS token to start from")
                + ": give it some text."
            )
        return [ids or [bos] for ids in token_ids]

    # ------------------------------------------------------------------ calls
    def __call__(
        self,
        texts: str | Sequence[str],
        batch_size: int | str = "auto",
        starting_batch_size: int | None = None,
        skip_prompt: bool = False,
        show_progress_bar: bool = True,
        log_batch_sample: int = -1,
        sort_prompts_by_length: bool = True,
        truncate_prompts: bool = False,
        **generation_kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Generate one answer per prompt, in input order.

        Args:
            texts: a prompt or a list of prompts (or of conversations: lists of role/content messages).
            batch_size: an integer, or ``"auto"``: start at ``starting_batch_size`` (default 16 on a
                CPU, 256 on an accelerator) and halve on out-of-memory (finished answers are kept).
            skip_prompt: return only the continuation (causal models; seq2seq never echo the prompt).
            log_batch_sample: log one decoded answer every ``n`` batches (``-1``: never).
            sort_prompts_by_length: batch prompts of similar length together (results stay in order).
            truncate_prompts: keep the end of prompts longer than the context instead of raising.
            **generation_kwargs: any ``GenerationConfig`` field or ``model.generate`` argument, plus
                ``seed`` (reproducible sampling), ``stop`` (stop strings), ``params``, ``store``,
                ``on_error``, ``dedup``, ``near_duplicates`` (see :meth:`generate`).

        Returns:
            ``list[str]``; with ``num_return_sequences=k > 1`` (or ``n=k``), a list of ``k`` answers per prompt.

        Example:
            >>> gen(["Tell me what's 2 + 2."], max_new_tokens=32, skip_prompt=True)   # doctest: +SKIP
        """
        results = self.generate(
            texts, batch_size=batch_size, starting_batch_size=starting_batch_size, skip_prompt=skip_prompt,
            show_progress_bar=show_progress_bar, log_batch_sample=log_batch_sample,
            sort_prompts_by_length=sort_prompts_by_length, truncate_prompts=truncate_prompts, **generation_kwargs)
        return [r.answer for r in results]

    def generate(self, texts: str | Sequence[str], **kwargs: Any) -> list[GenerationResult]:
        """Like ``gen(...)``, but one :class:`GenerationResult` per prompt (text(s), token ids, finish
        reason, token counts, error), in input order. Takes the arguments of :meth:`stream`.

        Example:
            >>> results = gen.generate(["Hi", "2 + 2?"], max_new_tokens=16, store="run.sqlite")  # doctest: +SKIP
            >>> [(r.text, r.finish_reason) for r in results]                                # doctest: +SKIP
        """
        inputs = validate_inputs(texts)
        results: list[GenerationResult | None] = [None] * len(inputs)
        for result in self.stream(inputs, **kwargs):
            results[result.index] = result
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"internal error: no result for prompts {missing[:10]}")
        return results  # type: ignore[return-value]

    def stream(
        self,
        texts: str | Sequence[str],
        *,
        images: Sequence[Any] | None = None,
        params: Sequence[dict[str, Any] | None] | None = None,
        store: str | os.PathLike | ResultStore | None = None,
        on_error: str = "raise",
        dedup: bool = True,
        near_duplicates: float | None = None,
        batch_size: int | str = "auto",
        starting_batch_size: int | None = None,
        skip_prompt: bool = False,
        show_progress_bar: bool = True,
        log_batch_sample: int = -1,
        sort_prompts_by_length: bool = True,
        truncate_prompts: bool = False,
        **generation_kwargs: Any,
    ) -> Iterator[GenerationResult]:
        """Generate, yielding one :class:`GenerationResult` per prompt as each finishes (completion order).

        Everything is checked before any generation starts (bad prompts, parameters, lengths).

        Args:
            images: image-text-to-text models: one entry per prompt, None or an image or a list of images (a PIL
                image, a path, bytes, a ``data:`` URL); conversations may hold image parts instead
                (``{"type": "image", "image": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``).
            params: one dict or :class:`~simple_generation.sampling_params.SamplingParams` (or None) per
                prompt with that prompt's own ``max_new_tokens`` (``max_tokens``, ``max_completion_tokens``),
                ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop`` (``stop_strings``), ``seed``,
                ``n`` (``num_return_sequences``), ``do_sample``, ``repetition_penalty``; they override the
                call's keywords.
            store: a SQLite file (path or :class:`ResultStore`): each answer is committed as it
                finishes; answers already there for the same model, prompt and parameters are
                returned (``cached=True``) instead of generated again.
            on_error: ``"raise"`` (a failing prompt raises :class:`BatchGenerationError`, with the
                finished answers on ``.partial``) or ``"record"`` (it gets a result with ``error``;
                failing batches are bisected so only the prompts that fail alone fail).
            dedup: identical (formatted prompt, parameters) are generated once and fanned out
                (deterministic decoding; sampled copies get independent samples).
            near_duplicates: a MinHash Jaccard threshold (e.g. 0.9): prompts at least that similar to
                an earlier one are not generated; their result says ``duplicate_of``.
            seed (keyword): sampled answers depend only on (prompt, parameters, seed).
            plain_prompts (keyword): ``True`` feeds string prompts as they are, without the named template or
                the chat template (OpenAI ``/v1/completions`` requests).
            The other arguments are those of ``__call__``.
        """
        formatter = self._formatter_for_call(generation_kwargs)
        reasoning = self._reasoning_for_call(generation_kwargs)  # feature: reasoning
        inputs = validate_inputs(texts)
        sources = None
        if self.vision is not None:  # feature: images: taken out of the prompts, decoded per prompt in plan_call
            from .vision import attach_images

            inputs, sources = attach_images(inputs, images, chat=formatter.formats_conversations,
                                            image_token=self.vision.image_token)
        elif images is not None and any(image is not None for image in images):
            raise ValueError("images were given, and this model takes text only: load an image-text-to-text model "
                             "(e.g. LLaVA, Qwen2-VL, SmolVLM) for image prompts.")
        own_store = isinstance(store, (str, os.PathLike))
        store_obj = ResultStore(store) if own_store else store
        builder = ParamsBuilder(self._model_generation_config, self.defaults, self.tokenizer.pad_token_id,
                                self.tokenizer, formatter.stop_strings, formatter.stop_token_ids,
                                self._forward_params)
        try:
            plan = plan_call(
                inputs, formatter=formatter, builder=builder, generation_kwargs=generation_kwargs, params=params,
                start_empty=self._start_empty_prompts, context_length=self.context_length,
                is_encoder_decoder=self.is_encoder_decoder, truncate=truncate_prompts, on_error=on_error,
                dedup=dedup, near_duplicates=near_duplicates, store=store_obj, router=self.router,
                model_identity=self._identity, skip_prompt=skip_prompt,
                postprocessor=PostProcessor(self.tokenizer, self.is_encoder_decoder, formatter.stop_token_ids,
                                            shown_special=self._shown_special, reasoning_markers=reasoning),
                vocab_size=model_vocab_size(self.config),  # feature: structured output
                images=sources, vision=self.vision,
            )
            requests = plan.to_generate()
            engine, why = plan.engine, plan.engine_reason
            on_cpu = self.model is None or str(getattr(self.model, "device", "cpu")).startswith("cpu")
            size, auto = resolve_batch_size(batch_size, starting_batch_size, max(1, len(requests)), on_cpu)
            engine.configure(size, auto, sort_prompts_by_length)
        except BaseException:
            if own_store and store_obj is not None:
                store_obj.close()
            raise
        return self._run_plan(plan, engine, why, show_progress_bar, log_batch_sample, own_store)

    def _run_plan(self, plan, engine, why, show_progress_bar, log_batch_sample, own_store
                  ) -> Iterator[GenerationResult]:
        distribution = self.distribution
        started = time.perf_counter()
        peak_memory = PeakMemory().__enter__()
        done: dict[int, GenerationResult] = {}
        generated = {"tokens": 0}
        progress = tqdm(total=plan.n_inputs, desc="Generating", unit="prompt",
                        disable=not show_progress_bar or not distribution.is_main or plan.n_inputs == 0)
        answers_done = 0

        def emit(result: GenerationResult) -> GenerationResult:
            done[result.index] = result
            progress.update(1)
            elapsed = time.perf_counter() - started
            progress.set_postfix(tok_s=f"{generated['tokens'] / max(elapsed, 1e-9):.1f}", refresh=False)
            return result

        try:
            with emissions_tracker(self.track_emissions and distribution.is_main and plan.n_inputs > 0,
                                   self.emissions_dir, self.model_name_or_path) as emissions:
                try:
                    for result in plan.ready:
                        yield emit(echo_ready(plan, result))
                    if distribution.world_size == 1:
                        for slot, answer in run_local(plan, engine):
                            generated["tokens"] += answer.completion_tokens
                            if self.compile_model and not self._first_call_logged:
                                self._first_call_logged = True
                                logger.info("compile_model: the first batch took %.1f s, torch.compile included "
                                            "(each new batch shape compiles again, then runs from the cache).",
                                            time.perf_counter() - started)
                            # one sample every `log_batch_sample` batches' worth of answers (a batch: the static
                            # engine's batch size, the continuous engine's slots)
                            answers_done += 1
                            batch = max(1, engine.stats.batch_size)
                            if log_batch_sample > 0 and answers_done % (log_batch_sample * batch) == 0:
                                logger.info("Sample from batch %d: %r", answers_done // batch, answer.texts[:1])
                            for result in fan_out(plan, slot, answer):
                                yield emit(result)
                    else:
                        for slot, answer in self._run_distributed(plan, engine, done):
                            generated["tokens"] += answer.completion_tokens
                            for result in fan_out(plan, slot, answer):
                                yield emit(result)
                except BatchFailed as err:
                    raise_failed(plan, err, done)
                except KeyboardInterrupt as err:
                    if type(err) is KeyboardInterrupt:
                        raise interrupted(done) from None
                    raise
                finally:
                    progress.close()
                    peak_memory.__exit__(None, None, None)
                    self.last_run = summarize(plan, done, started, engine.stats, engine.name, why)
                    self.last_run.generated_tokens = generated["tokens"]
                    self.last_run.peak_rss_mb, self.last_run.peak_cuda_mb = peak_memory.rss_mb, peak_memory.cuda_mb
            self.last_run.energy_kwh = emissions.energy_kwh
            self.last_run.emissions_kg_co2eq = emissions.emissions_kg_co2eq
        finally:
            if own_store and plan.store is not None:
                plan.store.close()

    def _run_distributed(self, plan, engine, done):
        """Data parallel: this process runs its share, then every process gets every answer."""
        distribution = self.distribution
        distribution.barrier()  # every process has read the store before any writes to it
        requests = plan.to_generate()
        slots = {slot.request.id: slot for slot in plan.slots}
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].token_ids))
        work = [len(r.token_ids) + r.max_new_tokens * r.params.num_return_sequences for r in requests]

        def run_shard(shard: list[int]) -> dict[int, Any]:
            answers = {}
            try:
                for slot, answer in run_local(plan, engine, [requests[i] for i in shard]):
                    answers[slot.request.id] = answer
            except BatchFailed as err:  # with this shard's finished answers on the error's `partial`
                finished = dict(done)
                for rid, answer in answers.items():
                    finished.update((result.index, result) for result in fan_out(plan, slots[rid], answer))
                raise_failed(plan, err, finished)
            return answers

        def local_stats() -> dict:
            return {"batches": engine.stats.batches, "forward_passes": engine.stats.forward_passes,
                    "batch_size": engine.stats.batch_size, "oom_retries": engine.stats.oom_retries,
                    "prompt_tokens": engine.stats.prompt_tokens,
                    "prefix_cached_tokens": engine.stats.prefix_cached_tokens}

        sharded = distribution.run(order, work, run_shard, local_stats)
        per_rank = sharded.stats
        engine.stats.batches = sum(s.get("batches", 0) for s in per_rank)
        engine.stats.oom_retries = sum(s.get("oom_retries", 0) for s in per_rank)
        engine.stats.forward_passes = sum(s.get("forward_passes", 0) for s in per_rank)
        engine.stats.prompt_tokens = sum(s.get("prompt_tokens", 0) for s in per_rank)
        engine.stats.prefix_cached_tokens = sum(s.get("prefix_cached_tokens", 0) for s in per_rank)
        sizes = [s.get("batch_size", 0) for s in per_rank if s.get("batch_size")]
        engine.stats.batch_size = min(sizes) if sizes else engine.stats.batch_size
        for rid in sorted(sharded.results):
            yield slots[rid], sharded.results[rid]

    # ------------------------------------------------------------------ conversations
    def conversation_from_user_prompts(
        self,
        user_prompts: Sequence[str] | Sequence[Sequence[str]],
        return_conversation: bool | None = None,
        return_last_response: bool | None = None,
        **kwargs: Any,
    ) -> Conversation | list[Conversation] | tuple:
        """Run a multi-turn conversation whose user turns are fixed in advance.

        Each user prompt is sent with the whole history so far, and the answer is appended. The history is
        formatted with the named template, else the tokenizer's chat template, else as a plain
        ``User:``/``Assistant:`` transcript. Takes the same keywords as ``__call__``. Given a list of prompt
        lists, runs many conversations at once: turn ``k`` of every conversation is one batched call.

        ``return_conversation`` / ``return_last_response`` keep the original API: when either is given,
        the result is a tuple ``(conversation, last_response)`` holding the requested items.

        Example:
            >>> conversation = gen.conversation_from_user_prompts(                    # doctest: +SKIP
            ...     ["What is 2 + 2?", "And times 3?"], max_new_tokens=64)
            >>> print(conversation)                                                 # doctest: +SKIP
        """
        single = bool(user_prompts) and all(isinstance(p, str) for p in user_prompts)
        batches = [list(user_prompts)] if single else [list(p) for p in user_prompts]
        for index, prompts in enumerate(batches):
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"user_prompts[{index}] must be a non-empty list of strings.")
        kwargs["skip_prompt"] = True
        conversations = [
            Conversation(template=self.formatter.template, system_message=self.formatter.system_message,
                         tokenizer=self.tokenizer)
            for _ in batches
        ]
        for turn in range(max((len(p) for p in batches), default=0)):
            active = [i for i, prompts in enumerate(batches) if turn < len(prompts)]
            for i in active:
                conversations[i].messages.append({"role": "user", "content": batches[i][turn]})
            # the named template, else the tokenizer's chat template, else the plain transcript (the formatter's)
            requests = [list(conversations[i].messages) for i in active]
            budgets = self._turn_budgets(requests, [batches[i][turn + 1:] for i in active], kwargs)
            call = dict(kwargs)
            if any(b is not None for b in budgets):
                call["params"] = [None if b is None else {"max_new_tokens": b} for b in budgets]
            answers = self(requests, **call)
            for i, answer in zip(active, answers):
                content = answer if isinstance(answer, str) else answer[0]
                conversations[i].messages.append({"role": "assistant", "content": content.strip()})
        result = conversations[0] if single else conversations
        if return_conversation is None and return_last_response is None:
            return result
        last = result.answers[-1] if single else [c.answers[-1] for c in conversations]
        return ((result,) if return_conversation in (None, True) else ()) + ((last,) if return_last_response else ())

    def _turn_budgets(self, requests: list[list[dict]], futures: list[list[str]], kwargs: dict[str, Any]
                      ) -> list[int | None]:
        """Multi-turn answers share the context: a turn with user turns still to come gets at most its share
        of the room they leave (context - the history with every remaining user prompt, split over this
        turn's and the later answers), so a long first answer cannot leave no room for the second turn. The
        last turn is capped by the call itself (as any prompt). None: no cap needed."""
        if self.context_length is None or "params" in kwargs:
            return [None] * len(requests)
        wanted = value_of(kwargs, "max_new_tokens", self.defaults.max_new_tokens)
        if not isinstance(wanted, int) or isinstance(wanted, bool):
            return [None] * len(requests)
        formatter = self._formatter_for_call(dict(kwargs))
        budgets: list[int | None] = []
        for messages, future in zip(requests, futures):
            if not future:
                budgets.append(None)
                continue
            upcoming = list(messages)
            for user in future:
                upcoming += [{"role": "assistant", "content": ""}, {"role": "user", "content": user}]
            try:
                needed = len(formatter.tokenize([formatter.format_one(upcoming)])[0])
            except Exception:  # noqa: BLE001 - a template refusal is reported by the call itself
                budgets.append(None)
                continue
            answers_left = len(future) + (0 if self.is_encoder_decoder else 1)
            share = max(1, (self.context_length - needed) // answers_left)
            budgets.append(share if share < wanted else None)
        if any(b is not None for b in budgets):
            logger.info("conversation_from_user_prompts: %d answer(s) capped to their share of the model's "
                        "context (%d tokens) so that the later turns still fit.",
                        sum(b is not None for b in budgets), self.context_length)
        return budgets

    # ------------------------------------------------------------------ scoring
    def score(self, contexts: str | Sequence[str], continuations: str | Sequence[str], **options: Any
              ) -> Score | list[Score]:
        """The log-likelihood of each continuation given its context (lm-evaluation-harness's ``loglikelihood``):
        per pair a :class:`~simple_generation.scoring.Score` (``logprob`` summed, ``token_logprobs``,
        ``num_tokens``, ``is_greedy``), in input order. Contexts are scored as given (raw text);
        ``apply_template=True`` formats them with the generator's template or chat template first.

        Two strings give one Score; one context and a list of continuations, or two lists of equal length,
        give a list. Options: ``batch_size``, ``starting_batch_size``, ``store`` (a SQLite file: scores are
        kept and a rerun reads them back), ``apply_template``, ``show_progress_bar``. Runs on the HF model, or
        on vLLM (``prompt_logprobs``) for a generator loaded with ``engine="vllm"``. See
        :mod:`simple_generation.scoring`.

        Example:
            >>> gen.score("The capital of France is", " Paris").logprob             # doctest: +SKIP
        """
        single = isinstance(contexts, str) and isinstance(continuations, str)
        if isinstance(continuations, str):
            continuations = [continuations]
        if isinstance(contexts, str):
            contexts = [contexts] * len(continuations)
        scores = self._score_pairs(list(contexts), list(continuations), **options)
        return scores[0] if single else scores

    def choose(self, prompts: str | Sequence[str], options: Sequence[str] | Sequence[Sequence[str]],
               **score_options: Any) -> Choice | list[Choice]:
        """Multiple choice: score every option as a continuation of the prompt; a
        :class:`~simple_generation.scoring.Choice` with the best by sum (``best``, lm-eval's ``acc``), per
        token (``best_per_token``) and per byte (``best_per_byte``, ``acc_norm``-style), and every score.
        Options are continuations as given: most tasks want a leading space (``" Paris"``). A list of prompts
        with a list of options each gives a list of Choices, all scored in one batched call. Takes the
        options of :meth:`score`.

        Example:
            >>> gen.choose("The capital of France is", [" Paris", " Rome"]).best   # doctest: +SKIP
            0
        """
        single = isinstance(prompts, str)
        per_prompt = [list(options)] if single else [list(o) for o in options]
        prompt_list = [prompts] if single else list(prompts)
        if len(prompt_list) != len(per_prompt):
            raise ValueError(f"{len(prompt_list)} prompts but {len(per_prompt)} option lists: give one each.")
        for i, choices in enumerate(per_prompt):
            if not choices or not all(isinstance(c, str) for c in choices):
                raise TypeError(f"options[{i}] must be a non-empty list of strings" +
                                (" (one prompt: choose(prompt, [option, ...]))" if single else "") + ".")
        contexts = [p for p, choices in zip(prompt_list, per_prompt) for _ in choices]
        scores = self._score_pairs(contexts, [c for choices in per_prompt for c in choices], **score_options)
        choices_out, at = [], 0
        for choices in per_prompt:
            choices_out.append(choose_from(scores[at:at + len(choices)], choices))
            at += len(choices)
        return choices_out[0] if single else choices_out

    def _score_pairs(self, contexts: list[str], continuations: list[str], *, apply_template: bool = False,
                     store: str | os.PathLike | ResultStore | None = None, batch_size: int | str = "auto",
                     starting_batch_size: int | None = None, show_progress_bar: bool = False) -> list[Score]:
        formatter = self.formatter
        family = "hf" if self.model is not None else family_of(self.engine)  # the runtime that computes the scores
        return score_pairs(
            self.model, self.tokenizer, contexts, continuations, is_encoder_decoder=self.is_encoder_decoder,
            context_length=self.context_length,
            format_context=(lambda text: str(formatter.format_one(text))) if apply_template else None,
            model_identity=self._identity(family), store=store, batch_size=batch_size,
            starting_batch_size=starting_batch_size, show_progress_bar=show_progress_bar, engine=self.engine)

    # ------------------------------------------------------------------ translation
    def translate(self, texts: str | Sequence[str], target: str | Sequence[str] | None = None,
                  source: str | Sequence[str] | None = None, **options: Any):
        """Translate documents with this model's own recipe (NLLB, M2M100, mBART-50, Marian, MADLAD/T5, or any
        LLM through a prompt template): languages by name, ISO code, BCP-47 tag or model code; long documents
        cut into sentences, batched, joined back with their whitespace. A string gives one
        :class:`~simple_generation.translation.Translation`, a list one per text. Options and keywords: see
        :func:`simple_generation.translation.translate` (``store=`` resumes per piece).

        Example:
            >>> gen.translate("Hello, world.", target="German", source="en").text   # doctest: +SKIP
            'Hallo, Welt.'
        """
        from .translation import translate

        return translate(self, texts, target=target, source=source, **options)

    # ------------------------------------------------------------------ web app
    def chat_app(self):
        """The gradio web app (chat and batch tabs) for this generator; ``.launch()`` it.

        Example:
            >>> gen.chat_app().launch()          # doctest: +SKIP
        """
        from .app import build_app

        return build_app(self)


def _first_token_id(value: int | list[int] | None) -> int | None:
    """A generation config's token id setting, which may be a list (the first one counts)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _generation_config_of(model_name_or_path, config, model_kwargs):
    from transformers import GenerationConfig

    try:
        keys = ("revision", "token", "cache_dir", "trust_remote_code")
        return GenerationConfig.from_pretrained(str(model_name_or_path), **{k: model_kwargs[k] for k in keys
                                                                            if k in model_kwargs})
    except Exception:  # noqa: BLE001 - checkpoints without generation_config.json
        return GenerationConfig.from_model_config(config)


def _own_keywords() -> tuple[str, ...]:
    """SimpleGenerator's keywords, offered as spellings when ``from_pretrained`` refuses an unknown one."""
    return tuple(p for p in inspect.signature(SimpleGenerator.__init__).parameters if p not in ("self", "model_kwargs"))


class SimpleVLMGenerator(SimpleGenerator):
    """The original project's name for image-text generation: a :class:`SimpleGenerator` whose ``__call__`` takes
    the images as its second argument, one per prompt (None, an image or a list of images).

    Example:
        >>> gen = SimpleVLMGenerator("llava-hf/llava-1.5-7b-hf")                                  # doctest: +SKIP
        >>> gen(["USER: <image>\nWhat is in this image? ASSISTANT:"], [Image.open("cat.png")])   # doctest: +SKIP
    """

    def __call__(self, texts: str | Sequence[str], images: Sequence[Any] | Any = None, *args: Any, **kwargs: Any
                 ) -> list[str] | list[list[str]]:
        if isinstance(texts, str) and images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        return super().__call__(texts, *args, images=images, **kwargs)
