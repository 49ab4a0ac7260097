"""Generation parameters: the call's keywords and each prompt's own, resolved into :class:`GenerationParams`.

Precedence, lowest to highest: the model's ``generation_config``, :class:`DefaultGenerationConfig`,
the call's keywords, the prompt's own ``params``. Per-prompt keys (and their OpenAI/vLLM aliases):
``max_new_tokens`` (``max_tokens``), ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``
(``stop_strings``), ``seed``, ``n`` (``num_return_sequences``), ``do_sample``, ``repetition_penalty``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from transformers import GenerationConfig

from .config import DefaultGenerationConfig, build_generation_config, split_generation_kwargs
from .io.records import normalize_stop
from .requests import GenerationParams, token_id_list

PER_PROMPT_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_strings", "seed",
                   "num_return_sequences", "do_sample", "repetition_penalty")
ALIASES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "stop": "stop_strings"}
# Config entries that never change an answer (bookkeeping), left out of fingerprints.
_NOT_ANSWER_RELEVANT = {"transformers_version", "_from_model_config", "_commit_hash", "return_dict_in_generate",
                        "output_scores", "output_logits", "output_attentions", "output_hidden_states",
                        "compile_config", "disable_compile", "cache_implementation", "cache_config",
                        "return_legacy_cache", "use_cache"}


def normalize_overrides(values: Mapping[str, Any], where: str, allowed: tuple[str, ...] | None = None
                        ) -> dict[str, Any]:
    """Apply aliases and check keys/types; ``allowed`` restricts the keys (per-prompt params)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ValueError(f"{where}: both {key!r} and its alias give {name!r}; pass one.")
        if allowed is not None and name not in allowed:
            names = sorted(set(allowed) | set(ALIASES))
            raise ValueError(f"{where}: unknown parameter {key!r}; per-prompt parameters are {', '.join(names)}.")
        out[name] = value
    if "stop_strings" in out:
        stops = normalize_stop(out["stop_strings"], where)
        if stops is None:
            del out["stop_strings"]
        else:
            out["stop_strings"] = stops
    seed = out.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{where}: `seed` must be an integer, got {seed!r}.")
    if out.get("temperature") == 0 and "do_sample" not in out:
        out["do_sample"] = False
    return out


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
                   call_kwargs: Mapping[str, Any], drop: tuple[str, ...] = ()) -> str:
    """A canonical string of everything that can change an answer (custom generate arguments by type only)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_ANSWER_RELEVANT and k not in drop}
    data["stop_strings"] = list(stop_strings)
    if "seed" not in drop:
        data["seed"] = seed
    data["generate_kwargs"] = {k: _canonical(v) for k, v in call_kwargs.items() if k != "tokenizer" and v is not None}
    return json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"))


class ParamsBuilder:
    """Builds one :class:`GenerationParams` per distinct parameter set of a call (cached by content; one
    builder serves one call, whose extra ``generate`` arguments are the same for every prompt).

    Example:
        >>> builder = ParamsBuilder(model.generation_config, DefaultGenerationConfig(), 0, tokenizer)  # doctest: +SKIP
        >>> params = builder.build({"max_new_tokens": 8, "temperature": 0})                           # doctest: +SKIP
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

    def split_call(self, generation_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The call's keywords as (config overrides incl. ``seed``, extra ``generate`` arguments)."""
        kwargs = dict(generation_kwargs)
        seed = kwargs.pop("seed", None)
        for alias, name in ALIASES.items():  # `n`, `max_tokens`, `stop` work for the call as for one prompt
            if alias in kwargs:
                if name in kwargs:
                    raise ValueError(f"Pass either `{alias}` or `{name}`, not both.")
                kwargs[name] = kwargs.pop(alias)
        config_kwargs, call_kwargs = split_generation_kwargs(kwargs, self.forward_params)
        overrides = normalize_overrides({**config_kwargs, **({"seed": seed} if seed is not None else {})}, "call")
        return overrides, call_kwargs

    def build(self, overrides: dict[str, Any], call_kwargs: Mapping[str, Any] | None = None) -> GenerationParams:
        call_kwargs = dict(call_kwargs or {})
        cache_key = json.dumps(_canonical(overrides), sort_keys=True)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        config_overrides = dict(overrides)
        seed = config_overrides.pop("seed", None)
        stops = config_overrides.pop("stop_strings", None) or []
        stop_strings = tuple(dict.fromkeys([*stops, *self.template_stop_strings]))
        if self.template_stop_ids and "eos_token_id" not in config_overrides:
            eos = token_id_list(self.model_config.eos_token_id if self.model_config is not None else None)
            config_overrides["eos_token_id"] = eos + [i for i in self.template_stop_ids if i not in eos]
        config = build_generation_config(self.model_config, self.defaults, config_overrides, self.pad_token_id)
        config.stop_strings = list(stop_strings) or None
        if stop_strings:
            call_kwargs.setdefault("tokenizer", self.tokenizer)
        params = GenerationParams(
            config=config, call_kwargs=call_kwargs, stop_strings=stop_strings, seed=seed,
            fingerprint=fingerprint_of(config, stop_strings, seed, call_kwargs),
            batch_key=fingerprint_of(config, stop_strings, seed, call_kwargs,
                                     drop=("max_new_tokens", "seed") if (config.num_beams or 1) == 1 else ("seed",)),
        )
        self._cache[cache_key] = params
        return params
