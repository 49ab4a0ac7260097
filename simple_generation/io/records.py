"""Input records, per-record parameters and output records (no torch, no transformers: cheap to import).

An :class:`InputRecord` is one prompt read from a file: its position (``index``), the prompt (a string or
a list of chat messages), its own generation parameters (``params``, by
:class:`~simple_generation.sampling_params.SamplingParams` field names), every other field of the record
(``fields``, carried unchanged into the output), an OpenAI Batch ``custom_id`` when there is one, and
where it came from (``source``, ``"file:line"``) for error messages, and its images (``images``: image
sources, see :mod:`simple_generation.images`, from the record's ``image``/``images`` field; relative paths
already resolved against the input file's folder).

A chat prompt whose messages hold image parts keeps them: its ``content`` is then a list of parts,
``{"type": "text", "text": str}`` and ``{"type": "image", "image": source}`` in their order (OpenAI
``image_url`` parts are normalised to the latter), so that the formatter places each image where it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..images import IMAGE_PART_TYPES, image_kind, resolve_path
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
    images: list[Any] | None = None  # image sources (paths resolved), from the `image`/`images` field


# ---------------------------------------------------------------------------------------------- images
IMAGE_FIELDS = ("image", "images")
IMAGE_PLACEHOLDER = "<image>"  # an image part in prompt_text


def _resolved(source: Any, base: str | os.PathLike | None) -> Any:
    """A source with a relative path (or a path-only image dict) made absolute against ``base``."""
    kind = image_kind(source)
    if kind == "path":
        return resolve_path(source, base)
    if kind == "dict" and not source.get("bytes"):
        return {"bytes": None, "path": resolve_path(source["path"], base)}
    return source


def _carried(source: Any) -> Any:
    """What an output record keeps of a source: a path or an http(s) URL as given; None for the rest
    (bytes, image dicts, data: URLs, base64 payloads, PIL images: they would bloat or break JSON)."""
    return source if image_kind(source) in ("path", "remote") and isinstance(source, str) else None


def _image_source(value: Any, where: str) -> Any:
    if image_kind(value) is None:
        if isinstance(value, dict):
            problem = f"an image object needs a non-empty \"bytes\" or \"path\", got {value!r:.80}"
        else:
            problem = f"{type(value).__name__} {value!r:.60} is not an image (expected a path, a data:/http(s) URL, " \
                      "base64, bytes or a {\"bytes\", \"path\"} object)"
        raise InputError(f"{where}: {problem}.")
    return value


def parse_images(record: Mapping[str, Any], where: str, *, base: str | os.PathLike | None = None,
                 from_text: bool = False) -> tuple[list[Any] | None, dict[str, Any]]:
    """A record's images from its ``image`` (one source) or ``images`` (a list; from CSV text a JSON list, or
    one value) field, and what its output record carries of them.

    Returns ``(images, carried)``: the sources with relative paths resolved against ``base`` (default: the
    current directory), or None when there is none (a missing, null, empty field, or an empty list); and
    ``{field: value}`` for the field the images came from (empty without images), the value the output
    record carries: paths and URLs as given, None in a list for a source that is not carried (bytes, image
    dicts, data: URLs, base64); None (leave the field out) for a single such source or a list of only such
    sources. Raises :class:`InputError` for a wrong type or both fields given.
    """
    present = {name: record[name] for name in IMAGE_FIELDS if name in record}
    given = {name: value for name, value in present.items() if value is not None and not (
        isinstance(value, (str, list, tuple)) and not (value.strip() if isinstance(value, str) else value))}
    if len(given) > 1:
        raise InputError(f"{where}: both \"image\" and \"images\" are given; put every image in \"images\".")
    if not given:
        return None, {}
    name, value = next(iter(given.items()))
    if from_text and name == "images" and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise InputError(f"{where}: field \"images\" starts with [ but is not a JSON list of image "
                             "paths or URLs.") from None
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray, memoryview)):  # a numpy array
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        sources = []
        for number, item in enumerate(value):
            if item is None:
                raise InputError(f"{where}: field \"{name}\": image {number} is null.")
            sources.append(_image_source(item, f"{where}: field \"{name}\", image {number}"))
        if not sources:
            return None, {}
        carried_list = [_carried(source) for source in sources]
        carried = {name: carried_list if any(item is not None for item in carried_list) else None}
    else:
        sources = [_image_source(value, f"{where}: field \"{name}\"")]
        carried = {name: _carried(value)}
    return [_resolved(source, base) for source in sources], carried


def image_identity(source: Any) -> str:
    """A short stable name for a source without decoding it: a path, URL or base64/data: payload by its text
    (long ones hashed), bytes by their sha256, a PIL image by its pixels."""
    kind = image_kind(source)
    if kind == "pil":
        from ..images import pixel_digest

        return "pixels:" + pixel_digest(source)
    if kind == "bytes":
        return "bytes:" + hashlib.sha256(bytes(source)).hexdigest()
    if kind == "dict":
        return image_identity(source["bytes"]) if source.get("bytes") else image_identity(source["path"])
    text = os.fspath(source) if kind == "path" else str(source)
    return text if len(text) <= 256 else "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def prompt_images(prompt: str | list[dict[str, Any]] | None) -> list[Any]:
    """The image sources of a prompt's image parts, in order (none for a string prompt)."""
    if not isinstance(prompt, list):
        return []
    return [_part_source(part) for message in prompt if isinstance(message, dict)
            and isinstance(message.get("content"), list) for part in message["content"]
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES]


def _part_source(part: dict[str, Any]) -> Any:
    value = part.get("image") if part.get("type") == "image" else None
    if value is None:
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    return value


def carried_prompt(prompt: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
    """A prompt as an output record gives it: image parts whose source is not carried (bytes, data: URLs,
    base64, dicts, PIL images) become ``{"type": "image"}`` (a path or URL stays)."""
    if not isinstance(prompt, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                               for m in prompt):
        return prompt
    out = []
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and _carried(part.get("image")) is None:
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


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
    texts = [prompt] if isinstance(prompt, str) else [_content_text(m.get("content")) for m in prompt or []]
    for number, text in enumerate(texts):
        position = lone_surrogate(text) if isinstance(text, str) else None
        if position is not None:
            where = "the prompt" if isinstance(prompt, str) else f"message {number}"
            return (f"{where} holds a lone surrogate (U+{ord(text[position]):04X} at character {position}), which is "
                    "not valid Unicode text (half of a cut emoji?); fix or drop it")
    return None


def _content_text(content: Any) -> Any:
    """A message's text: its content string, or its text parts joined (an image part adds nothing)."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return content


def _content_parts(content: list[Any], where: str, base: str | os.PathLike | None) -> str | list[dict[str, Any]]:
    """A content part list: the text parts joined into a string when there are only text parts (as before
    images), else the parts in order, ``image_url`` (and Responses' ``input_image``) parts normalised to
    ``{"type": "image", "image": ...}`` (``detail`` ignored) and relative paths resolved against ``base``."""
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        if kind in IMAGE_PART_TYPES:
            value = part.get("image") if kind == "image" else None
            if value is None and "image_url" in part:  # OpenAI: {"url": ...}, or the URL (Responses' input_image)
                value = part["image_url"]
                value = value.get("url") if isinstance(value, dict) else value
            if kind != "image" and not isinstance(value, str):
                raise InputError(f"{where}: an image_url part needs {{\"image_url\": {{\"url\": \"...\"}}}}, got "
                                 f"{part!r:.120}.")
            source = _image_source(value, f"{where}: image part")
            parts.append({"type": "image", "image": _resolved(source, base)})
            continue
        raise InputError(f"{where}: only text and image content parts are supported, got {part!r:.120}.")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def validate_messages(messages: Any, where: str, *, base: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """A chat message list (``[{"role", "content"}, ...]``). OpenAI content parts of type text are joined into
    one string; with image parts (``image_url``, or ``image`` with any image source) the content stays a part
    list (see the module docstring), relative image paths resolved against ``base`` (default: the current
    directory)."""
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
            content = _content_parts(content, f"{where}: message {position}", base)
        if not isinstance(content, (str, list)):
            raise InputError(f"{where}: message {position}: \"content\" must be a string, got {content!r}.")
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise InputError(f"{where}: message {position}: unknown role {message['role']!r}.")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def prompt_text(prompt: str | list[dict[str, Any]] | None) -> str:
    """A prompt as one string (messages as ``role: content`` lines), for hashing and near-dedup; an image part
    is ``<image>`` (the images themselves are not text)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {_part_text(m.get('content'))}" for m in prompt)


def _part_text(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) and part.get("type") == "text" else
                   IMAGE_PLACEHOLDER if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES else ""
                   for part in content)


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

    Images: the ``image``/``images`` fields are carried as :func:`parse_images` left them in ``fields`` (paths
    and URLs as given, not bytes, image dicts, data: URLs or base64); in a chat prompt, an image part whose
    source is not a path or URL becomes ``{"type": "image"}`` (see :func:`carried_prompt`).
    """
    out: dict[str, Any] = {}
    for key, value in record.fields.items():
        out[f"input_{key}" if key in OUTPUT_KEYS or (reasoning and key == "reasoning") else key] = value
    if record.custom_id is not None and "custom_id" not in out:
        out["custom_id"] = record.custom_id
    out["index"] = record.index
    out["prompt"] = carried_prompt(record.prompt)
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
