"""Input records, per-record parameters and output records (no torch, no transformers: cheap to import).

An :class:`InputRecord` is one prompt read from a file: its position (``index``), the prompt (a string or
a list of chat messages), its own generation parameters (``params``), every other field of the record
(``fields``, carried unchanged into the output), an OpenAI Batch ``custom_id`` when there is one, and
where it came from (``source``, ``"file:line"``) for error messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class InputError(ValueError):
    """An input file or record that cannot be used; the message starts with ``file:line:``."""


def normalize_stop(value: Any, where: str, error: type[ValueError] = ValueError) -> list[str] | None:
    """``stop``/``stop_strings`` as a list of non-empty strings (None when not given)."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise error(f"{where}: `stop` must be a string or a list of strings, got {value!r}.")
    if any(v == "" for v in values):
        raise error(f"{where}: an empty stop string would end every answer before it starts; remove it.")
    return list(values)


# Record keys that are generation parameters (canonical name -> kind). Aliases are mapped first.
PARAM_KINDS: dict[str, str] = {
    "max_new_tokens": "int>=1",
    "temperature": "float>=0",
    "top_p": "float(0,1]",
    "top_k": "int>=0",
    "min_p": "float[0,1]",
    "stop": "stop",
    "seed": "int",
    "n": "int>=1",
    "do_sample": "bool",
    "repetition_penalty": "float>0",
}
PARAM_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                 "num_return_sequences": "n", "stop_strings": "stop"}
PARAM_KEYS = frozenset(PARAM_KINDS) | frozenset(PARAM_ALIASES)

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

# Names of the output record's own columns; a carried field with one of these names is kept as `input_<name>`.
OUTPUT_KEYS = ("index", "prompt", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "error",
               "duplicate_of")


@dataclass
class OpenAIRequest:
    """What an OpenAI Batch input line said besides the prompt (needed to write a matching output line)."""

    url: str = "/v1/chat/completions"
    method: str = "POST"
    model: str | None = None

    @property
    def chat(self) -> bool:
        url = self.url.rstrip("/")
        return url.endswith("chat/completions") or not url.endswith("completions")


@dataclass
class InputRecord:
    """One prompt of an input file (see the module docstring)."""

    index: int
    prompt: str | list[dict[str, Any]] | None
    params: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    custom_id: str | None = None
    source: str = ""
    openai: OpenAIRequest | None = None


def _number(value: Any, *, integer: bool, where: str, key: str, from_text: bool) -> int | float:
    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise InputError(f"{where}: `{key}` must be {'an integer' if integer else 'a number'}, "
                             f"got {value!r}.") from None
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # 20.0 from a CSV/parquet float column
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise InputError(f"{where}: `{key}` must be {'an integer' if integer else 'a number'}, got {value!r}.")
    if not integer and not math.isfinite(value):
        raise InputError(f"{where}: `{key}` must be a finite number, got {value!r}.")
    return value


def validate_param(key: str, value: Any, where: str, *, from_text: bool = False) -> Any:
    """Check one per-record parameter (canonical ``key``); return its value, converted from text for CSV."""
    kind = PARAM_KINDS[key]
    if kind == "stop":
        if from_text and isinstance(value, str) and value.startswith("["):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                pass
        return normalize_stop(value, where, InputError)
    if kind == "bool":
        if from_text and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if not isinstance(value, bool):
            raise InputError(f"{where}: `{key}` must be true or false, got {value!r}.")
        return value
    number = _number(value, integer=kind.startswith("int"), where=where, key=key, from_text=from_text)
    bad = {
        "int>=1": number < 1, "int>=0": number < 0, "int": False, "float>=0": number < 0,
        "float(0,1]": not 0 < number <= 1, "float[0,1]": not 0 <= number <= 1, "float>0": number <= 0,
    }[kind]
    if bad:
        bounds = {"int>=1": ">= 1", "int>=0": ">= 0", "float>=0": ">= 0", "float(0,1]": "in (0, 1]",
                  "float[0,1]": "in [0, 1]", "float>0": "> 0"}[kind]
        raise InputError(f"{where}: `{key}` must be {bounds}, got {value!r}.")
    return number


def split_params(record: Mapping[str, Any], where: str, *, from_text: bool = False,
                 exclude: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record's generation parameters (validated, canonical names) and its other fields.

    Missing values (``None``, or an empty CSV cell) are "not set".
    """
    params: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if key in exclude:
            continue
        if key not in PARAM_KEYS:
            if key in GENERATION_CONFIG_FIELDS:
                raise InputError(f"{where}: `{key}` is a generation setting that cannot be set per record (per-record "
                                 f"parameters: {', '.join(sorted(PARAM_KEYS))}); set it for the whole run "
                                 f"(--generation {key}=...) or rename the field.")
            fields[key] = value
            continue
        if value is None or (from_text and value == ""):
            continue
        name = PARAM_ALIASES.get(key, key)
        if name in params:
            raise InputError(f"{where}: both {key!r} and another name for `{name}` are set; keep one.")
        params[name] = validate_param(name, value, where, from_text=from_text)
    return params, fields


def lone_surrogate(text: str) -> int | None:
    """The position of the first lone surrogate in ``text`` (not valid Unicode: UTF-8 cannot encode it, e.g.
    half of an emoji cut by a scraper), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def prompt_problem(prompt: str | list[dict[str, Any]] | None) -> str | None:
    """Why a prompt cannot be generated from, found without a model (today: a lone surrogate), or None."""
    texts = [prompt] if isinstance(prompt, str) else [m.get("content") for m in prompt or []]
    for number, text in enumerate(texts):
        position = lone_surrogate(text) if isinstance(text, str) else None
        if position is not None:
            where = "the prompt" if isinstance(prompt, str) else f"message {number}"
            return (f"{where} holds a lone surrogate (U+{ord(text[position]):04X} at character {position}), which is "
                    "not valid Unicode text (half of a cut emoji?); fix or drop it")
    return None


def validate_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A chat message list (``[{"role", "content"}, ...]``); OpenAI content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {type(messages).__name__}.")
    out = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"{where}: message {position} must be an object with \"role\" and \"content\", "
                             f"got {message!r}.")
        content = message["content"]
        if isinstance(content, list):  # OpenAI content parts
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InputError(f"{where}: message {position}: only text content parts are supported, "
                                     f"got {part!r}.")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InputError(f"{where}: message {position}: \"content\" must be a string, got {content!r}.")
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise InputError(f"{where}: message {position}: unknown role {message['role']!r}.")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def prompt_text(prompt: str | list[dict[str, Any]] | None) -> str:
    """A prompt as one string (messages as ``role: content`` lines), for hashing and near-dedup."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _get(result: Any, name: str, default: Any = None) -> Any:
    return getattr(result, name, default) if not isinstance(result, Mapping) else result.get(name, default)


def output_record(record: InputRecord, result: Any = None, *, duplicate_of: int | None = None) -> dict[str, Any]:
    """The output record of ``record``: its carried fields, then ``index``, ``prompt`` (as given, not the
    template-formatted text), ``answer`` (a list when n > 1), ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens``, ``error`` (None when fine), and ``duplicate_of`` when it was not generated because
    it is a near-duplicate of an earlier record.

    ``result`` is a ``GenerationResult`` (or a mapping with the same names); None with ``duplicate_of``.
    """
    out: dict[str, Any] = {}
    for key, value in record.fields.items():
        out[f"input_{key}" if key in OUTPUT_KEYS else key] = value
    if record.custom_id is not None and "custom_id" not in out:
        out["custom_id"] = record.custom_id
    out["index"] = record.index
    out["prompt"] = record.prompt
    if result is None:
        out.update(answer=None, finish_reason=None, prompt_tokens=None, completion_tokens=None, error=None)
    else:
        error = _get(result, "error")
        texts = _get(result, "texts")
        reasons = _get(result, "finish_reasons")
        many = texts is not None and len(texts) > 1
        if error is not None:
            answer = None
        elif many:
            answer = list(texts)
        else:
            answer = _get(result, "text")
            if answer is None and texts:
                answer = texts[0]
        out["answer"] = answer
        out["finish_reason"] = (list(reasons) if many and reasons is not None else _get(result, "finish_reason"))
        out["prompt_tokens"] = _get(result, "prompt_tokens")
        out["completion_tokens"] = _get(result, "completion_tokens")
        out["error"] = error
        if duplicate_of is None:
            duplicate_of = _get(result, "duplicate_of")
    if duplicate_of is not None:
        out["duplicate_of"] = duplicate_of
    return out
