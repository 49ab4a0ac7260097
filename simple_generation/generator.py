"""The ``SimpleGenerator`` façade: load once, then generate for lists of prompts."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import DefaultGenerationConfig, build_generation_config, split_generation_kwargs
from .conversation import Conversation
from .distributed import current_distribution
from .emissions import track_emissions as emissions_tracker
from .engine import HFEngine
from .formatting import PromptFormatter, validate_inputs
from .loading import LoadOptions, context_length, load_for_generation
from .results import RunSummary
from .scheduling import BatchRunner, length_order, resolve_batch_size
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
        model_name_or_path: hub id or local folder of an ``AutoModelForCausalLM`` or
            ``AutoModelForSeq2SeqLM`` checkpoint.
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
        **model_kwargs: for ``from_pretrained``; ``load_in_8bit``/``load_in_4bit`` become a
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
        **model_kwargs: Any,
    ):
        if "system_prompts" in model_kwargs:  # the original README's spelling
            if system_prompt is not None:
                raise ValueError("Pass either `system_prompt` or `system_prompts`, not both.")
            system_prompt = model_kwargs.pop("system_prompts")
        if isinstance(system_prompt, str):
            system_prompt = get_template(system_prompt)  # an unknown name fails before the model loads
        self.distribution = current_distribution()
        loaded = load_for_generation(
            model_name_or_path,
            tokenizer_name_or_path=tokenizer_name_or_path,
            device=self.distribution.load_device(device, "device_map" in model_kwargs),
            options=LoadOptions(lora_weights, merge_lora, compile_model, use_bettertransformer),
            **model_kwargs,
        )
        self.model_name_or_path = str(model_name_or_path)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = self.model.config
        self.is_encoder_decoder = loaded.is_encoder_decoder
        self.placement = loaded.placement
        self.compile_model = loaded.compiled
        self._first_call_logged = False
        logger.info(
            "Loaded %s: %s, dtype %s, on %s (%s); LoRA: %s; quantization: %s; compiled: %s; attention: %s.",
            model_name_or_path, type(self.model).__name__, self.model.dtype, loaded.placement,
            loaded.placement_reason, loaded.lora or "none", loaded.quantization or "none",
            "yes (static KV cache)" if loaded.compiled else "no", loaded.attention or "default",
        )
        self.formatter = PromptFormatter(
            self.tokenizer, template=system_prompt, system_message=system_message,
            apply_chat_template=apply_chat_template, add_generation_prompt=add_generation_prompt,
        )
        self.track_emissions = track_emissions
        self.emissions_dir = emissions_dir
        self.defaults = generation_defaults or DefaultGenerationConfig()
        self.engine = HFEngine(self.model, self.tokenizer, self.is_encoder_decoder)
        self.context_length = context_length(self.model)
        self._forward_params = set(inspect.signature(self.model.forward).parameters)
        self.last_run = RunSummary()

    # ------------------------------------------------------------------ inputs
    def _tokenize(self, prompts: list[str], max_new_tokens: int, truncate: bool) -> list[list[int]]:
        token_ids = self._start_empty_prompts(self.formatter.tokenize(prompts))
        limit = self.context_length
        if limit is None:
            return token_ids
        room = limit if self.is_encoder_decoder else limit - max_new_tokens
        too_long = [i for i, ids in enumerate(token_ids) if len(ids) > limit]
        if too_long and not truncate:
            first = too_long[0]
            raise ValueError(
                f"{len(too_long)} prompt(s) are longer than the model's context of {limit} tokens "
                f"(prompt {first} has {len(token_ids[first])} tokens). Shorten them, or pass "
                "truncate_prompts=True to keep the end of each prompt."
            )
        if truncate:
            if room < 1:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context "
                    f"of {limit} tokens; lower max_new_tokens."
                )
            bos = self.tokenizer.bos_token_id
            for i, ids in enumerate(token_ids):
                if len(ids) > room:
                    keep_bos = bos is not None and ids[0] == bos
                    token_ids[i] = ([bos] if keep_bos else []) + ids[len(ids) - room + int(keep_bos):]
        elif not self.is_encoder_decoder:
            overflow = [i for i, ids in enumerate(token_ids) if len(ids) + max_new_tokens > limit]
            if overflow:
                logger.warning(
                    "%d prompt(s) plus max_new_tokens=%d exceed the model's context of %d tokens; "
                    "their answers may be cut or degrade.", len(overflow), max_new_tokens, limit,
                )
        return token_ids

    def _formatter_for_call(self, generation_kwargs: dict[str, Any]) -> PromptFormatter:
        """The constructor's formatter, or one with this call's ``apply_chat_template``/``add_generation_prompt``.

        The original API took both at call time; ``num_workers`` (its DataLoader workers) has no use here.
        """
        generation_kwargs.pop("num_workers", None)
        options = {k: generation_kwargs.pop(k) for k in ("apply_chat_template", "add_generation_prompt")
                   if k in generation_kwargs}
        if not options:
            return self.formatter
        current = self.formatter
        return PromptFormatter(
            self.tokenizer, template=current.template, system_message=current.system_message,
            apply_chat_template=options.get("apply_chat_template", current.apply_chat_template),
            add_generation_prompt=options.get("add_generation_prompt", current.add_generation_prompt),
        )

    def _start_empty_prompts(self, token_ids: list[list[int]]) -> list[list[int]]:
        """A prompt with no tokens starts from BOS, as ``model.generate()`` without inputs does."""
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if not empty:
            return token_ids
        bos = _first_token_id(self.model.generation_config.bos_token_id)
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

    def _add_template_stops(self, config_kwargs: dict[str, Any], call_kwargs: dict[str, Any]) -> None:
        """A named template's stop strings and stop token ids end generation (unless the call sets its own)."""
        stop_strings = self.formatter.stop_strings
        if stop_strings and "stop_strings" not in config_kwargs:
            config_kwargs["stop_strings"] = stop_strings
            call_kwargs.setdefault("tokenizer", self.tokenizer)
        stop_ids = self.formatter.stop_token_ids
        if stop_ids and "eos_token_id" not in config_kwargs:
            eos = self.model.generation_config.eos_token_id
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            config_kwargs["eos_token_id"] = eos + [i for i in stop_ids if i not in eos]

    @staticmethod
    def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    # ------------------------------------------------------------------ outputs
    def _eos_ids(self, generation_config) -> set[int]:
        eos = generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}

    def _trim(self, tokens: list[int], eos_ids: set[int], start_id: int | None) -> list[int]:
        """Drop the decoder start token and everything after the first EOS (padding)."""
        if self.is_encoder_decoder and tokens and start_id is not None and tokens[0] == start_id:
            tokens = tokens[1:]
        for position, token in enumerate(tokens):
            if token in eos_ids:
                return tokens[: position + 1]
        return tokens

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        texts: str | Sequence[str],
        batch_size: int | str = "auto",
        starting_batch_size: int = 256,
        skip_prompt: bool = False,
        show_progress_bar: bool = True,
        log_batch_sample: int = -1,
        sort_prompts_by_length: bool = True,
        truncate_prompts: bool = False,
        **generation_kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Generate one answer per prompt, in input order.

        Args:
            texts: a prompt or a list of prompts.
            batch_size: an integer, or ``"auto"`` to start at ``starting_batch_size`` and halve on
                out-of-memory (finished batches are kept).
            skip_prompt: return only the continuation (causal models; seq2seq never echo the prompt).
            log_batch_sample: log one decoded answer every ``n`` batches (``-1``: never).
            sort_prompts_by_length: batch prompts of similar length together (results stay in order).
            truncate_prompts: keep the end of prompts longer than the context instead of raising.
            **generation_kwargs: any ``GenerationConfig`` field or ``model.generate`` argument.

        Returns:
            ``list[str]``; with ``num_return_sequences=k > 1``, a list of ``k`` answers per prompt.

        Example:
            >>> gen(["Tell me what's 2 + 2."], max_new_tokens=32, skip_prompt=True)   # doctest: +SKIP
        """
        formatter = self._formatter_for_call(generation_kwargs)
        prompts = formatter.format(validate_inputs(texts))
        if not prompts:
            self.last_run = RunSummary()
            return []
        config_kwargs, call_kwargs = split_generation_kwargs(generation_kwargs, self._forward_params)
        self._add_template_stops(config_kwargs, call_kwargs)
        generation_config = build_generation_config(
            self.model.generation_config, self.defaults, config_kwargs, self.tokenizer.pad_token_id
        )
        size, auto = resolve_batch_size(batch_size, starting_batch_size, len(prompts))
        token_ids = self._tokenize(prompts, generation_config.max_new_tokens, truncate_prompts)
        return self._generate(
            token_ids, generation_config, call_kwargs, size, auto, skip_prompt, show_progress_bar,
            log_batch_sample, sort_prompts_by_length,
        )

    def _generate(self, token_ids, generation_config, call_kwargs, size, auto, skip_prompt,
                  show_progress_bar, log_batch_sample, sort) -> list:
        eos_ids = self._eos_ids(generation_config)
        start_id = _first_token_id(generation_config.decoder_start_token_id)
        n_return = generation_config.num_return_sequences or 1
        stop_strings = generation_config.stop_strings or []
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        # The model's own EOS ids decode as HF's generate does; a template's stop ids are never shown.
        hidden_stop_ids = set(self.formatter.stop_token_ids) & eos_ids
        started = time.perf_counter()
        stats = {"tokens": 0, "batches": 0}

        def run_batch(indices: list[int]) -> list[str | list[str]]:
            batch_started = time.perf_counter()
            outputs = self.engine.generate_batch([token_ids[i] for i in indices], generation_config, call_kwargs)
            if self.compile_model and not self._first_call_logged:
                self._first_call_logged = True
                logger.info("compile_model: the first batch took %.1f s, torch.compile included (each new batch "
                            "shape compiles again, then runs from the cache).", time.perf_counter() - batch_started)
            answers = []
            for index, sequences in zip(indices, outputs):
                texts = []
                for sequence in sequences:
                    new = self._trim(sequence, eos_ids, start_id)
                    stats["tokens"] += len(new)
                    if new and new[-1] in hidden_stop_ids:  # a template's stop id may not be a special token
                        new = new[:-1]
                    text = self.tokenizer.decode(new, skip_special_tokens=True)
                    text, stopped = self._cut_at_stop(text, stop_strings)
                    if not skip_prompt and not self.is_encoder_decoder:
                        whole = self.tokenizer.decode(token_ids[index] + new, skip_special_tokens=True)
                        if stopped:
                            prompt_text = self.tokenizer.decode(token_ids[index], skip_special_tokens=True)
                            whole = prompt_text + text
                        text = whole
                    texts.append(text)
                answers.append(texts[0] if n_return == 1 else texts)
            return answers

        # With data parallelism the main process only sees its own share; the shares are balanced, so its
        # fraction done stands for the whole run's, and the bar is completed once every process is done.
        distribution = self.distribution
        progress = tqdm(total=len(token_ids), desc="Generating", unit="prompt",
                        disable=not show_progress_bar or not distribution.is_main)
        share = {"size": len(token_ids), "done": 0}

        def on_batch_done(indices: list[int], answers: list) -> None:
            stats["batches"] += 1
            share["done"] += len(indices)
            scale = len(token_ids) / max(share["size"], 1)
            elapsed = time.perf_counter() - started
            progress.set_postfix(tok_s=f"{stats['tokens'] * scale / max(elapsed, 1e-9):.1f}", batch=len(indices),
                                 refresh=False)
            progress.update(min(len(token_ids), round(share["done"] * scale)) - progress.n)
            if log_batch_sample > 0 and stats["batches"] % log_batch_sample == 0:
                logger.info("Sample from batch %d: %r", stats["batches"], answers[0])

        def run_shard(shard: list[int]) -> dict:
            share["size"] = len(shard)
            return runner.run(shard, on_batch_done)

        def local_stats() -> dict:
            return {"prompts": share["size"], "tokens": stats["tokens"], "batches": stats["batches"],
                    "batch_size": min(runner.batch_size, share["size"]) or runner.batch_size,
                    "oom_retries": runner.oom_retries}

        runner = BatchRunner(run_batch, size, auto)
        order = length_order([len(t) for t in token_ids], sort)
        # Shards are balanced by the tokens each prompt's sequences will hold: prompt plus new tokens.
        work = [len(t) + (generation_config.max_new_tokens or 0) * n_return for t in token_ids]
        with emissions_tracker(self.track_emissions and distribution.is_main, self.emissions_dir,
                               self.model_name_or_path) as emissions:
            try:
                sharded = distribution.run(order, work, run_shard, local_stats)
                progress.update(len(token_ids) - progress.n)
            finally:
                progress.close()
        results = sharded.results
        per_rank = sharded.stats
        busy = [s for s in per_rank if s.get("prompts")] or per_rank
        self.last_run = RunSummary(
            prompts=len(token_ids),
            sequences=len(token_ids) * n_return,
            generated_tokens=sum(s.get("tokens", 0) for s in per_rank),
            wall_time_s=time.perf_counter() - started,
            batch_size=min(s.get("batch_size", runner.batch_size) for s in busy),
            batches=sum(s.get("batches", 0) for s in per_rank),
            oom_retries=sum(s.get("oom_retries", 0) for s in per_rank),
            energy_kwh=emissions.energy_kwh,
            emissions_kg_co2eq=emissions.emissions_kg_co2eq,
        )
        return [results[i] for i in range(len(token_ids))]

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
        templated = self.formatter.formats_conversations
        conversations = [
            Conversation(template=self.formatter.template, system_message=self.formatter.system_message,
                         tokenizer=self.tokenizer)
            for _ in batches
        ]
        for turn in range(max((len(p) for p in batches), default=0)):
            active = [i for i, prompts in enumerate(batches) if turn < len(prompts)]
            for i in active:
                conversations[i].messages.append({"role": "user", "content": batches[i][turn]})
            if templated:  # messages go through the named template or the tokenizer's chat template
                requests = [list(conversations[i].messages) for i in active]
            else:  # no template at all: the plain transcript is the prompt
                requests = [f"{conversations[i]}\nAssistant:" for i in active]
            answers = self(requests, **kwargs)
            for i, answer in zip(active, answers):
                content = answer if isinstance(answer, str) else answer[0]
                conversations[i].messages.append({"role": "assistant", "content": content.strip()})
        result = conversations[0] if single else conversations
        if return_conversation is None and return_last_response is None:
            return result
        last = result.answers[-1] if single else [c.answers[-1] for c in conversations]
        return ((result,) if return_conversation in (None, True) else ()) + ((last,) if return_last_response else ())


def _first_token_id(value: int | list[int] | None) -> int | None:
    """A generation config's token id setting, which may be a list (the first one counts)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
