"""Input records, per-record parameters and output records (no torch, no transformers: cheap to import).

An :class:`InputRecord` is one prompt read from a file: its position (``index``), the prompt (a string or
a list of chat messages), its own generation parameters (``params``, by
:class:`~simple_generation.sampling_params.SamplingParams` field names), every other field of the record
(``fields``, carried unchanged into the output), an OpenAI Batch ``custom_id`` when there is one, and
where it came from (``source``, ``"file:line"``) for error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..sampling_params import GENERATION_CONFIG_FIELDS, PER_PROMPT_KEYS, SamplingParams

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


def split_params(record: Mapping[str, Any], where: str, *, from_text: bool = False,
                 exclude: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record's generation parameters and its other fields.

    The parameters are the record's :data:`~simple_generation.sampling_params.PER_PROMPT_KEYS`, checked by
    :class:`~simple_generation.sampling_params.SamplingParams` and given by their canonical names
    (``SamplingParams.to_dict()``: ``n`` becomes ``num_return_sequences``, ``stop`` ``stop_strings``). Missing
    values (``None``, or an empty CSV cell) are "not set". Any other ``GenerationConfig`` field is refused
    (set it for the whole run); every other key is a carried field.
    """
    given: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if key in exclude:
            continue
        if key in PER_PROMPT_KEYS:
            given[key] = value
        elif key in GENERATION_CONFIG_FIELDS:
            raise InputError(f"{where}: `{key}` is a generation setting that cannot be set per record (per-record "
                             f"parameters: {', '.join(sorted(PER_PROMPT_KEYS))}); set it for the whole run "
                             f"(--generation {key}=...) or rename the field.")
        else:
            fields[key] = value
    try:
        params = SamplingParams.from_dict(given, where, from_text=from_text, per_prompt=True)
    except ValueError as err:
        raise InputError(str(err)) from None
    return params.to_dict(), fields


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


def logprobs_json(entries: Any) -> list[dict[str, Any] | None] | None:
    """Typed logprobs (:class:`~simple_generation.results.TokenLogprob` entries; None for a prompt's first
    token) as JSON: ``{"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}]}``."""
    if entries is None:
        return None
    return [None if entry is None else
            {"token_id": entry.token_id, "token": entry.token, "logprob": entry.logprob,
             "top_logprobs": [{"token_id": top.token_id, "token": top.token, "logprob": top.logprob}
                              for top in entry.top]}
            for entry in entries]


def output_record(record: InputRecord, result: Any = None, *, duplicate_of: int | None = None,
                  reasoning: bool = False) -> dict[str, Any]:
    """The output record of ``record``: its carried fields, then ``index``, ``prompt`` (as given, not the
    template-formatted text), ``answer`` (a list when n > 1), ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens``, ``error`` (None when fine), and ``duplicate_of`` when it was not generated because
    it is a near-duplicate of an earlier record. With ``reasoning`` (the run splits reasoning off: a reasoning
    model), ``reasoning`` follows ``answer`` in every record (None without a block; a list when n > 1), so the
    records of other models keep exactly their fields.

    ``result`` is a ``GenerationResult`` (or a mapping with some of its names, e.g. ``{"error": ...}``); None
    with ``duplicate_of``.
    """
    out: dict[str, Any] = {}
    for key, value in record.fields.items():
        out[f"input_{key}" if key in OUTPUT_KEYS or (reasoning and key == "reasoning") else key] = value
    if record.custom_id is not None and "custom_id" not in out:
        out["custom_id"] = record.custom_id
    out["index"] = record.index
    out["prompt"] = record.prompt
    if result is None:
        out.update(answer=None, **({"reasoning": None} if reasoning else {}), finish_reason=None, prompt_tokens=None,
                   completion_tokens=None, error=None)
    else:
        error = _get(result, "error")
        outputs = _get(result, "outputs") or []
        many = len(outputs) > 1
        if error is not None or not outputs:
            answer = None
        elif many:
            answer = [output.text for output in outputs]
        else:
            answer = outputs[0].text
        out["answer"] = answer
        if reasoning:  # feature: reasoning
            thoughts = [getattr(output, "reasoning", None) for output in outputs]
            out["reasoning"] = None if answer is None else thoughts if many else thoughts[0]
        if many:
            out["finish_reason"] = [output.finish_reason for output in outputs]
        else:
            out["finish_reason"] = outputs[0].finish_reason if outputs else None
        out["prompt_tokens"] = _get(result, "prompt_tokens")
        out["completion_tokens"] = _get(result, "completion_tokens")
        out["error"] = error
        # feature: logprobs: only in the records of prompts that asked (the others keep exactly their fields)
        if error is None and any(getattr(output, "logprobs", None) is not None for output in outputs):
            values = [logprobs_json(getattr(output, "logprobs", None)) for output in outputs]
            out["logprobs"] = values if many else values[0]
        prompt_logprobs = _get(result, "prompt_logprobs")
        if error is None and prompt_logprobs is not None:
            out["prompt_logprobs"] = logprobs_json(prompt_logprobs)
        if duplicate_of is None:
            duplicate_of = _get(result, "duplicate_of")
    if duplicate_of is not None:
        out["duplicate_of"] = duplicate_of
    return out
