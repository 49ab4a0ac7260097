"""Generation parameters resolved into :class:`GenerationParams`: the call's keywords and each prompt's own.

Both arrive as :class:`~simple_generation.sampling_params.SamplingParams` (one alias table, one validation;
see that module). Precedence, lowest to highest: the model's ``generation_config``,
:class:`DefaultGenerationConfig`, the call's keywords, the prompt's own ``params``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from transformers import GenerationConfig

from .config import DefaultGenerationConfig, build_generation_config, split_generation_kwargs
from .constrained import constraint_of
from .requests import GenerationParams, token_id_list
from .sampling_params import CONSTRAINT_FIELDS, SamplingParams, check_params_list

# Config entries that never change an answer (bookkeeping), left out of fingerprints.
_NOT_ANSWER_RELEVANT = {"transformers_version", "_from_model_config", "_commit_hash", "return_dict_in_generate",
                        "output_scores", "output_logits", "output_attentions", "output_hidden_states",
                        "compile_config", "disable_compile", "cache_implementation", "cache_config",
                        "return_legacy_cache", "use_cache"}


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def fingerprint_of(config: GenerationConfig, stop_strings: tuple[str, ...], seed: int | None,
                   call_kwargs: Mapping[str, Any], drop: tuple[str, ...] = (),
                   extra: Mapping[str, Any] | None = None) -> str:
    """A canonical string of everything that can change an answer (custom generate arguments by type only)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_ANSWER_RELEVANT and k not in drop}
    data["stop_strings"] = list(stop_strings)
    if "seed" not in drop:
        data["seed"] = seed
    data["generate_kwargs"] = {k: _canonical(v) for k, v in call_kwargs.items() if k != "tokenizer" and v is not None}
    data.update(extra or {})  # what else changes what an answer holds (e.g. logprobs asked for)
    return json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"))


class ParamsBuilder:
    """Builds one :class:`GenerationParams` per distinct parameter set of a call (cached by content; one
    builder serves one call, whose extra ``generate`` arguments are the same for every prompt).

    Example:
        >>> builder = ParamsBuilder(model.generation_config, DefaultGenerationConfig(), 0, tokenizer)  # doctest: +SKIP
        >>> per_prompt = builder.for_prompts({"max_new_tokens": 8}, [None, {"temperature": 0.9}], 2)  # doctest: +SKIP
    """

    def __init__(self, model_config: GenerationConfig | None, defaults: DefaultGenerationConfig,
                 pad_token_id: int | None, tokenizer: Any, template_stop_strings: list[str] | None = None,
                 template_stop_ids: list[int] | None = None, forward_params: set[str] | None = None):
        self.model_config = model_config
        self.defaults = defaults
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.template_stop_strings = list(template_stop_strings or [])
        self.template_stop_ids = list(template_stop_ids or [])
        self.forward_params = forward_params
        self._cache: dict[str, GenerationParams] = {}
        SamplingParams.from_dict(defaults.to_dict(), "generation_defaults")  # its values in range, as a call's

    def split_call(self, generation_kwargs: Mapping[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
        """The call's keywords as (its parameters, extra ``generate`` arguments); a keyword that neither
        ``GenerationConfig``, ``generate`` nor the model's ``forward`` takes is a ``TypeError``."""
        params = SamplingParams.from_dict(generation_kwargs, "call")
        config_kwargs, call_kwargs = split_generation_kwargs(dict(params.extra), self.forward_params)
        return replace(params, extra=config_kwargs), call_kwargs

    def for_prompts(self, generation_kwargs: Mapping[str, Any],
                    params: Sequence[Mapping[str, Any] | SamplingParams | None] | None, n: int
                    ) -> list[GenerationParams]:
        """One :class:`GenerationParams` per prompt: the call's keywords, with each prompt's own ``params``
        (a dict, a :class:`SamplingParams` or None) on top. Errors name ``params[i]``."""
        check_params_list(params, n)
        base, call_kwargs = self.split_call(generation_kwargs)
        base_params = self.build(base, call_kwargs) if n else None
        per_prompt: list[GenerationParams] = []
        for index in range(n):
            own = params[index] if params is not None else None
            if own is None:
                per_prompt.append(base_params)
                continue
            where = f"params[{index}]"
            if not isinstance(own, (Mapping, SamplingParams)):
                raise ValueError(f"{where} must be a dict, a SamplingParams or None, got {type(own).__name__}.")
            merged = base.merge(SamplingParams.from_dict(own, where, per_prompt=True))
            try:
                per_prompt.append(self.build(merged, call_kwargs))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
        return per_prompt

    def build(self, params: SamplingParams, call_kwargs: Mapping[str, Any] | None = None) -> GenerationParams:
        """The resolved parameters of ``params`` (cached by content)."""
        call_kwargs = dict(call_kwargs or {})
        overrides = params.overrides()
        cache_key = json.dumps(_canonical(overrides), sort_keys=True)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        config_overrides = dict(overrides)
        seed = config_overrides.pop("seed", None)
        # feature: logprobs: not GenerationConfig fields; in the fingerprint (when set) but not the batch key
        logprobs = config_overrides.pop("logprobs", None)
        prompt_logprobs = config_overrides.pop("prompt_logprobs", None)
        # feature: structured output: not GenerationConfig fields; in the fingerprint (when set), not the batch key
        constraint = constraint_of(SamplingParams(**{name: config_overrides.pop(name, None)
                                                     for name in CONSTRAINT_FIELDS}))
        stops = config_overrides.pop("stop_strings", None) or []
        stop_strings = tuple(dict.fromkeys([*stops, *self.template_stop_strings]))
        if self.template_stop_ids and "eos_token_id" not in config_overrides:
            eos = token_id_list(self.model_config.eos_token_id if self.model_config is not None else None)
            config_overrides["eos_token_id"] = eos + [i for i in self.template_stop_ids if i not in eos]
        config = build_generation_config(self.model_config, self.defaults, config_overrides, self.pad_token_id)
        config.stop_strings = list(stop_strings) or None
        if stop_strings:
            call_kwargs.setdefault("tokenizer", self.tokenizer)
        if logprobs is not None and (config.num_beams or 1) > 1:
            raise ValueError(f"logprobs with beam search (num_beams={config.num_beams}) is not supported: the "
                             "log-probabilities of a beam's tokens are not recorded; use num_beams=1.")
        # answers without logprobs keep the keys they had before logprobs existed
        asked = {k: v for k, v in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)) if v is not None}
        if constraint is not None:  # feature: structured output
            if (config.num_beams or 1) > 1:
                raise ValueError(f"structured output ({constraint.kind}) with beam search (num_beams="
                                 f"{config.num_beams}) is not supported; use num_beams=1.")
            asked["constraint"] = constraint.fingerprint()
        fingerprint = fingerprint_of(config, stop_strings, seed, call_kwargs, extra=asked)
        resolved = GenerationParams(
            config=config, call_kwargs=call_kwargs, stop_strings=stop_strings, seed=seed,
            fingerprint=fingerprint, logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint,
            batch_key=fingerprint_of(config, stop_strings, seed, call_kwargs,
                                     drop=("max_new_tokens", "seed") if (config.num_beams or 1) == 1 else ("seed",)),
        )
        self._cache[cache_key] = resolved
        return resolved
