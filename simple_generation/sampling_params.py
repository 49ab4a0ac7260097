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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

ALIASES: dict[str, str] = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                           "n": "num_return_sequences", "stop": "stop_strings"}
"""The one alias table: another name -> the field it sets."""

CONSTRAINT_FIELDS = ("json_schema", "json", "regex", "choices", "grammar")
"""The structured-output fields (see :mod:`simple_generation.constrained`): at most one per prompt."""

PER_PROMPT_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_strings", "seed",
                     "num_return_sequences", "do_sample", "repetition_penalty", "logprobs", "prompt_logprobs",
                     *CONSTRAINT_FIELDS)
"""The fields a prompt (``params=[...]``, a file record, an OpenAI Batch body) may set for itself; the others
(``num_beams``, ``min_new_tokens``, any other ``GenerationConfig`` field) are set for a whole call or run."""

# the fields, their aliases, and the OpenAI keys that map onto fields (`top_logprobs` with `logprobs: true`,
# `response_format` onto a constraint)
PER_PROMPT_KEYS = (frozenset(PER_PROMPT_FIELDS) | frozenset(k for k, v in ALIASES.items() if v in PER_PROMPT_FIELDS)
                   | {"top_logprobs", "response_format"})
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
    # feature: logprobs
    "logprobs": ("int", 0, True, None),
    "prompt_logprobs": ("int", 0, True, None),
    # feature: structured output (see simple_generation.constrained)
    "json_schema": ("schema", None, True, None),
    "json": ("bool", None, True, None),
    "regex": ("text", None, True, None),
    "choices": ("choices", None, True, None),
    "grammar": ("text", None, True, None),
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
        logprobs: per generated token, its log-probability and the ``k`` most likely alternatives (0: the
            chosen token's only); log-softmax of the model's raw logits, before temperature, top-p, penalties.
            OpenAI's ``logprobs=True, top_logprobs=k`` means ``logprobs=k``.
        prompt_logprobs: the same for the prompt's tokens (the first token has none).
        json_schema: structured output: the answer is JSON valid against this schema (a dict, its JSON text,
            or a pydantic model class; kept as compact JSON text, properties in the order given). OpenAI's
            ``response_format={"type": "json_schema", "json_schema": {"schema": ...}}`` sets it.
        json: structured output: ``True``, the answer is a JSON value (``response_format={"type":
            "json_object"}``); ``False``: free text (a prompt's way to drop the call's constraint).
        regex: structured output: the answer matches this regular expression.
        choices: structured output: the answer is one of these strings.
        grammar: structured output: the answer is a string of this EBNF/GBNF grammar (XGrammar's dialect,
            rule ``root``). At most one of ``json_schema``, ``json``, ``regex``, ``choices``, ``grammar``
            per prompt; a prompt's own replaces the call's. An answer cut by ``max_new_tokens``
            (``finish_reason="length"``) is incomplete.
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
    # feature: logprobs
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # feature: structured output
    json_schema: str | None = None
    json: bool | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None
    grammar: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _RULES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _checked(name, name, value, "SamplingParams", from_text=False))
        constrained = [name for name in CONSTRAINT_FIELDS if getattr(self, name) not in (None, False)]
        if len(constrained) > 1:  # feature: structured output
            raise ValueError(f"SamplingParams: give at most one of json_schema, json, regex, choices, grammar "
                             f"(got {', '.join(constrained)}).")
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
        values = _openai_logprobs(values, where, from_text)  # feature: logprobs
        values = _response_format(values, where, from_text)  # feature: structured output
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
        if "choices" in out:  # feature: structured output
            out["choices"] = list(out["choices"])
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
        if any(getattr(other, name) is not None for name in CONSTRAINT_FIELDS):  # feature: structured output
            changes = {**dict.fromkeys(CONSTRAINT_FIELDS), **changes}  # a prompt's constraint replaces the call's
        return dataclasses.replace(self, **changes, extra={**self.extra, **other.extra})


def check_params_list(params: Any, n: int) -> None:
    """Raise ``ValueError`` unless ``params`` is None or a list with one entry per prompt (``n`` prompts).

    Example:
        >>> check_params_list([None, {"seed": 1}], 2)
    """
    if params is not None and (isinstance(params, (Mapping, SamplingParams)) or not isinstance(params, Sequence)
                               or len(params) != n):
        raise ValueError(f"params must be a list with one dict (or None) per prompt: {n} prompts, got "
                         f"{len(params) if isinstance(params, Sequence) else type(params).__name__}.")


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


def _openai_logprobs(values: Mapping[str, Any], where: str, from_text: bool) -> Mapping[str, Any]:
    """OpenAI's ``logprobs: true`` (+ ``top_logprobs: k``) as ``logprobs=k``; ``logprobs: false``: not set.
    An integer ``logprobs`` (vLLM's) is kept as it is. (feature: logprobs)"""
    flag = values.get("logprobs")
    if from_text and isinstance(flag, str) and flag.strip().lower() in ("true", "false"):
        flag = flag.strip().lower() == "true"
    top = values.get("top_logprobs")
    if from_text and isinstance(top, str) and top.strip() == "":
        top = None
    if not isinstance(flag, bool) and "top_logprobs" not in values:
        return values
    out = {k: v for k, v in values.items() if k not in ("logprobs", "top_logprobs")}
    if top is not None and flag is not True:
        raise ValueError(f"{where}: `top_logprobs` needs `logprobs: true` (or give `logprobs` the number "
                         "of alternatives).")
    if flag is True:
        out["logprobs"] = 0 if top is None else top
    elif flag is not None and flag is not False:
        out["logprobs"] = flag
    return out


def _checked(name: str, key: str, value: Any, where: str, *, from_text: bool) -> Any:
    """``value`` for field ``name`` (given as ``key``), converted (text, integral floats) and range-checked."""
    kind, low, low_inclusive, high = _RULES[name]
    label = f"`{key}`" if key == name else f"`{key}` (`{name}`)"  # an alias: both names in the message
    if kind in ("schema", "text", "choices"):  # feature: structured output
        return _constraint_value(kind, value, label, where, from_text)
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


# ---------------------------------------------------------------- feature: structured output
def _response_format(values: Mapping[str, Any], where: str, from_text: bool) -> Mapping[str, Any]:
    """OpenAI's ``response_format`` as ``json_schema`` / ``json`` (``{"type": "text"}``: nothing)."""
    if "response_format" not in values:
        return values
    out = {k: v for k, v in values.items() if k != "response_format"}
    spec = values["response_format"]
    if from_text and isinstance(spec, str):
        if spec.strip() == "":
            return out
        try:
            spec = json.loads(spec)
        except ValueError:
            raise ValueError(f"{where}: `response_format` must be a JSON object, got {spec!r}.") from None
    if spec is None:
        return out
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind == "text":
        return out
    if kind == "json_object":
        target, value = "json", True
    elif kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if schema is None:
            raise ValueError(f'{where}: `response_format` of type "json_schema" needs '
                             '{"json_schema": {"name": ..., "schema": {...}}}.')
        target, value = "json_schema", schema
    else:
        raise ValueError(f'{where}: `response_format` must be {{"type": "text" | "json_object" | "json_schema", '
                         f"...}}, got {spec!r}.")
    if out.get(target) is not None:
        raise ValueError(f"{where}: pass either `response_format` or `{target}`, not both.")
    out[target] = value
    return out


def _constraint_value(kind: str, value: Any, label: str, where: str, from_text: bool) -> Any:
    """A structured-output value: a schema as canonical JSON text, a regex/grammar text, choices as a tuple."""
    if kind == "schema":
        if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model class
            value = value.model_json_schema()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise ValueError(f"{where}: {label} must be a JSON schema (a dict, its JSON text or a pydantic "
                                 f"model class); its text is not JSON: {err}.") from None
        if not isinstance(value, (Mapping, bool)):
            raise ValueError(f"{where}: {label} must be a JSON schema (a dict, its JSON text or a pydantic model "
                             f"class), got {type(value).__name__}.")
        try:
            # compact JSON in the order given: properties are generated in this order, so it is part of the value
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {label} is not JSON-serializable: {err}.") from None
    if kind == "text":
        if not isinstance(value, str) or value == "":
            raise ValueError(f"{where}: {label} must be a non-empty string, got {value!r}.")
        return value
    if from_text and isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{where}: {label} must be a list of strings (a JSON list in a text cell), got "
                             f"{value!r}.") from None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: {label} must be a non-empty list of non-empty strings, got {value!r}.")
    return tuple(value)
