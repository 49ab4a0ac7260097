"""Generation parameters as one typed value, :class:`SamplingParams` (no torch, no transformers: cheap to import).

Every way of giving generation settings goes through :meth:`SamplingParams.from_dict`, so the same key means
the same thing everywhere and a wrong value is refused with the place it came from:

- a call's keywords (``gen(prompts, max_new_tokens=64, temperature=0)``; where: ``call``);
- a prompt's own ``params=[...]`` (where: ``params[3]``);
- a file record's parameter fields, CSV cells converted from text (where: ``file.jsonl:13: record 12``);
- an OpenAI Batch request body (where: ``batch.jsonl:2: request 'req-1'``);
- the command line's options and ``--generation KEY=VALUE`` (where: ``--generation``).

Aliases (OpenAI's and vLLM's names): ``max_tokens`` and ``max_completion_tokens`` mean ``max_new_tokens``,
``n`` means ``num_return_sequences``, ``stop`` means ``stop_strings``.

``temperature=0`` means greedy decoding (whatever ``do_sample`` says); a ``temperature`` above 0 given
without ``do_sample`` means sampling.

A field left ``None`` is not set: it falls back to the next level down. Precedence, lowest to highest: the
model's ``generation_config``, :class:`~simple_generation.config.DefaultGenerationConfig`, the call's
keywords, the prompt's own ``params``.

Example:
    >>> from simple_generation.sampling_params import SamplingParams
    >>> params = SamplingParams.from_dict({"max_tokens": 64, "temperature": 0.7, "stop": "\\n"}, "call")
    >>> params.max_new_tokens, params.sampled, params.stop_strings
    (64, True, ('\\n',))
    >>> params.overrides()
    {'max_new_tokens': 64, 'temperature': 0.7, 'stop_strings': ['\\n'], 'do_sample': True}
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ALIASES: dict[str, str] = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                           "n": "num_return_sequences", "stop": "stop_strings"}
"""The one alias table: another name -> the field it sets."""

PER_PROMPT_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_strings", "seed",
                     "num_return_sequences", "do_sample", "repetition_penalty")
"""The fields a prompt (``params=[...]``, a file record, an OpenAI Batch body) may set for itself; the others
(``num_beams``, ``min_new_tokens``, any other ``GenerationConfig`` field) are set for a whole call or run."""

PER_PROMPT_KEYS = frozenset(PER_PROMPT_FIELDS) | frozenset(k for k, v in ALIASES.items() if v in PER_PROMPT_FIELDS)
"""The per-prompt fields and their aliases: the record keys that are parameters rather than carried fields."""

# transformers' GenerationConfig fields that change an answer (4.56-5.x), known without importing it: a record
# key with one of these names (and not a per-record parameter) is refused rather than carried as metadata, and
# --generation checks its keys against them (tests/test_hardening_cli.py keeps the list true).
GENERATION_CONFIG_FIELDS = frozenset({
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_ensemble_weight", "assistant_lookbehind",
    "bad_words_ids", "speculation_type", "target_lookbehind", "top_h", "use_mtp",
    "begin_suppress_tokens", "bos_token_id", "cache_implementation", "constraints", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "dola_layers", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "eos_token_id", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "force_words_ids", "forced_bos_token_id", "forced_eos_token_id", "guidance_scale", "length_penalty",
    "low_memory", "max_length", "max_matching_ngram_size", "max_new_tokens", "max_time", "min_length",
    "min_new_tokens", "min_p", "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "num_beam_groups", "num_beams", "num_return_sequences", "pad_token_id", "penalty_alpha",
    "prompt_lookup_num_tokens", "remove_invalid_values", "renormalize_logits", "repetition_penalty",
    "sequence_bias", "stop_strings", "suppress_tokens", "temperature", "token_healing", "top_k", "top_p",
    "typical_p", "use_cache", "watermarking_config",
})
# Arguments of `model.generate` that are not GenerationConfig attributes.
GENERATE_CALL_ARGS = frozenset({
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "tokenizer",
    "assistant_tokenizer",
})

# field -> (kind, lowest, lowest allowed, highest): the one validation of every typed field
_RULES: dict[str, tuple[str, float | None, bool, float | None]] = {
    "max_new_tokens": ("int", 1, True, None),
    "min_new_tokens": ("int", 0, True, None),
    "temperature": ("float", 0, True, None),
    "top_p": ("float", 0, False, 1),
    "top_k": ("int", 0, True, None),
    "min_p": ("float", 0, True, 1),
    "do_sample": ("bool", None, True, None),
    "repetition_penalty": ("float", 0, False, None),
    "num_return_sequences": ("int", 1, True, None),
    "num_beams": ("int", 1, True, None),
    "stop_strings": ("stop", None, True, None),
    "seed": ("int", None, True, None),
}

FIELD_NAMES = tuple(_RULES)
"""The typed fields of :class:`SamplingParams` (``extra`` aside)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: every setting a call, a prompt, a file record or an OpenAI Batch body may give.

    Build one with :meth:`from_dict` (aliases, values converted and checked, errors naming where they came
    from) or directly (checked the same way). ``None`` means "not set": the value comes from the level
    below (see the module docstring). ``SimpleGenerator.generate(..., params=[...])`` takes these or plain
    dicts, one per prompt.

    Attributes:
        max_new_tokens: most new tokens per answer (``max_tokens``, ``max_completion_tokens``); capped to the
            room the model's context leaves. An integer >= 1.
        min_new_tokens: no end of sequence before this many new tokens. An integer >= 0. Whole call only.
        temperature: sampling temperature, >= 0; 0 means greedy decoding. Above 0 without ``do_sample``
            means sampling.
        top_p: nucleus sampling, in (0, 1]; used only when sampling.
        top_k: top-k sampling, >= 0 (0: off); used only when sampling.
        min_p: min-p sampling, in [0, 1]; used only when sampling.
        do_sample: sample (True) or decode greedily / with beams (False).
        repetition_penalty: > 0; 1.0 is no penalty.
        num_return_sequences: answers per prompt (``n``), >= 1; more than 1 needs sampling or beams.
        num_beams: beam search width, >= 1 (1: no beams). Whole call only.
        stop_strings: strings that end an answer (``stop``; a string or a list); the answer is cut before
            the first one found. An empty tuple: no stop strings (overriding the call's).
        seed: sampling seed (any integer): a sampled answer depends only on (prompt, parameters, seed).
        extra: any other ``GenerationConfig`` field or ``model.generate`` argument, passed to HF generation
            as it is (the static engine; other engines refuse what they cannot honour). Whole call only;
            do not mutate it.

    Example:
        >>> SamplingParams(temperature=0).sampled
        False
        >>> SamplingParams(max_new_tokens=8, temperature=0).merge(SamplingParams(temperature=0.9, seed=1))
        SamplingParams(max_new_tokens=8, temperature=0.9, seed=1)
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    num_beams: int | None = None
    stop_strings: tuple[str, ...] | None = None
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _RULES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _checked(name, name, value, "SamplingParams", from_text=False))
        extra = dict(self.extra)
        typed = sorted(set(extra) & (set(_RULES) | set(ALIASES)))
        if typed:
            raise ValueError(f"SamplingParams: `extra` holds {', '.join(typed)}; give them as fields.")
        object.__setattr__(self, "extra", extra)

    def __repr__(self) -> str:  # only what is set
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None]
        if self.extra:
            shown.append(f"extra={dict(self.extra)!r}")
        return f"SamplingParams({', '.join(shown)})"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | SamplingParams, where: str = "call", *, from_text: bool = False,
                  per_prompt: bool = False) -> SamplingParams:
        """Parameters from a mapping of names (aliases allowed) to values, checked, errors starting ``where:``.

        ``from_text``: the values may be text (CSV cells): numbers and ``true``/``false`` are parsed, a stop
        cell starting with ``[`` is read as a JSON list, and an empty cell is "not set". ``None`` is always
        "not set" for a typed field. ``per_prompt``: only :data:`PER_PROMPT_KEYS` are accepted (a prompt's
        ``params``, a file record, an OpenAI body); otherwise other keys go to ``extra``.

        Example:
            >>> SamplingParams.from_dict({"n": "2", "stop": '["END"]'}, "rows.csv:3", from_text=True)
            SamplingParams(num_return_sequences=2, stop_strings=('END',))
        """
        if isinstance(values, SamplingParams):
            values = values.to_dict()
        typed: dict[str, Any] = {}
        given: dict[str, str] = {}  # field -> the key that set it
        extra: dict[str, Any] = {}
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if per_prompt and key not in PER_PROMPT_KEYS:
                if name in _RULES or name in GENERATION_CONFIG_FIELDS or name in GENERATE_CALL_ARGS:
                    raise ValueError(f"{where}: `{key}` cannot be set per prompt (per-prompt parameters: "
                                     f"{', '.join(sorted(PER_PROMPT_KEYS))}); set it for the whole call.")
                raise ValueError(f"{where}: unknown parameter {key!r}; per-prompt parameters are "
                                 f"{', '.join(sorted(PER_PROMPT_KEYS))}.")
            if name not in _RULES:
                extra[key] = value
                continue
            if value is None or (from_text and isinstance(value, str) and value == ""):
                continue  # not set
            if name in given:
                raise ValueError(f"{where}: pass either `{given[name]}` or `{key}`, not both (both set "
                                 f"`{name}`).")
            given[name] = key
            typed[name] = _checked(name, key, value, where, from_text=from_text)
        return cls(**typed, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as given (canonical names; ``stop_strings`` as a list), then ``extra``.

        Example:
            >>> SamplingParams.from_dict({"n": 2, "temperature": 0.7}).to_dict()
            {'temperature': 0.7, 'num_return_sequences': 2}
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        if "stop_strings" in out:
            out["stop_strings"] = list(out["stop_strings"])
        out.update(self.extra)
        return out

    def overrides(self) -> dict[str, Any]:
        """What these parameters set over the level below (what
        :class:`~simple_generation.params.ParamsBuilder` applies): :meth:`to_dict` with ``do_sample`` as the
        temperature implies it (0: greedy, whatever ``do_sample`` says; above 0 without ``do_sample``: sampling).

        Example:
            >>> SamplingParams(temperature=0.7).overrides()
            {'temperature': 0.7, 'do_sample': True}
        """
        out = self.to_dict()
        sampled = self.sampled
        if sampled is not None:
            out["do_sample"] = sampled
        return out

    @property
    def sampled(self) -> bool | None:
        """Whether these parameters ask for sampling: ``do_sample`` as the temperature implies it (None: not
        said, the level below decides)."""
        if self.temperature == 0:
            return False
        if self.do_sample is None and self.temperature is not None:
            return True
        return self.do_sample

    def merge(self, other: SamplingParams) -> SamplingParams:
        """These parameters with ``other``'s set fields (and ``extra`` entries) on top: a prompt's own
        parameters over the call's. A temperature given by ``other`` without ``do_sample`` decides sampling
        on its own (a prompt's ``temperature=0.9`` samples under a greedy call).

        Example:
            >>> SamplingParams(max_new_tokens=8, do_sample=False).merge(SamplingParams(temperature=0.9)).sampled
            True
        """
        changes = {f.name: getattr(other, f.name) for f in fields(other)
                   if f.name != "extra" and getattr(other, f.name) is not None}
        if other.temperature is not None and other.do_sample is None:
            changes["do_sample"] = None
        return dataclasses.replace(self, **changes, extra={**self.extra, **other.extra})


def value_of(values: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """The value of field ``name`` in a raw mapping, under its own name or any alias (``default`` if absent).

    Example:
        >>> value_of({"max_tokens": 8}, "max_new_tokens")
        8
    """
    for key in (name, *[alias for alias, target in ALIASES.items() if target == name]):
        if key in values:
            return values[key]
    return default


def _checked(name: str, key: str, value: Any, where: str, *, from_text: bool) -> Any:
    """``value`` for field ``name`` (given as ``key``), converted (text, integral floats) and range-checked."""
    kind, low, low_inclusive, high = _RULES[name]
    label = f"`{key}`" if key == name else f"`{key}` (`{name}`)"  # an alias: both names in the message
    if kind == "stop":
        return _stop(value, label, where, from_text)
    if kind == "bool":
        if from_text and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {label} must be true or false, got {value!r}.")
        return value
    integer = kind == "int"
    wanted = "an integer" if integer else "a number"
    if from_text and isinstance(value, str):
        try:
            value = int(value.strip()) if integer else float(value.strip())
        except ValueError:
            raise ValueError(f"{where}: {label} must be {wanted}, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {label} must be {wanted}, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {label} must be a finite number, got {value!r}.")
    if integer:
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise ValueError(f"{where}: {label} must be {wanted}, got {value!r}.")
        value = int(value)  # 20.0 from a CSV/parquet float column, numpy integers
    elif not isinstance(value, (int, float)):
        value = float(value)
    if low is not None:
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            if high is None:
                bounds = f"{'>=' if low_inclusive else '>'} {low:g}"
            else:
                bounds = f"in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
            raise ValueError(f"{where}: {label} must be {bounds}, got {value!r}.")
    return value


def _stop(value: Any, label: str, where: str, from_text: bool) -> tuple[str, ...]:
    if from_text and isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a stop string that starts with "["
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: {label} must be a string or a list of strings, got {value!r}.")
    if any(v == "" for v in values):
        raise ValueError(f"{where}: an empty stop string would end every answer before it starts; remove it.")
    return tuple(values)
