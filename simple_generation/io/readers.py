"""Read prompts from files, lazily: ``read_records(path)`` yields :class:`InputRecord` objects one at a time.

Formats (by extension, case-insensitive; ``input_format=`` overrides, and is sniffed for stdin ``-``):

- ``.txt``: one prompt per line. Lines are split on ``\\n`` only (a U+2028 inside a line stays in the
  prompt), a trailing ``\\r`` is dropped, blank lines are skipped.
- ``.jsonl``: one JSON value per ``\\n``-separated line: an object with a ``prompt`` (else ``text``, else
  ``messages``) field, or a bare JSON string. OpenAI Batch request lines (``custom_id`` + ``body``) are
  recognised automatically.
- ``.json``: a list of such records.
- ``.csv``: a header row; the prompt column as above; parameter columns are converted from text.
- ``.parquet``: read by record batches (pyarrow).
- a folder written by ``datasets``' ``save_to_disk`` (needs ``datasets``).

Files are read as UTF-8 (a leading BOM is dropped). Every error names the file and its line (or row).
Record keys that are generation parameters (``max_new_tokens``/``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``/``stop_strings``, ``seed``,
``n``/``num_return_sequences``, ``do_sample``, ``repetition_penalty``: see
:mod:`simple_generation.sampling_params`) go to ``params``; all other keys are carried unchanged in ``fields``.

Images (see :mod:`simple_generation.images`): a record's ``image`` (one source) or ``images`` (a list; in a CSV
cell a JSON list or one value) field becomes ``InputRecord.images``: paths, ``data:``/http(s) URLs, base64,
bytes (a parquet binary column), ``{"bytes", "path"}`` objects (parquet image columns written by ``datasets``,
``datasets.Image`` features, which are not decoded here). Chat messages may hold image parts (OpenAI
``image_url`` with a URL, a ``data:`` URL or a path; or ``{"type": "image", "image": source}``). Relative
paths are resolved against the input file's folder (stdin: the current directory). Images are only named
here: a missing or undecodable file is found when its window is generated. The output record carries the
image fields' paths and URLs as given, not bytes, image objects, ``data:`` URLs or base64.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..sampling_params import SamplingParams
from .formats import INPUT_FORMATS, input_format_of
from .records import (
    InputError,
    InputRecord,
    OpenAIRequest,
    image_identity,
    parse_images,
    prompt_text,
    split_params,
    validate_messages,
)

FORMATS = INPUT_FORMATS  # ("txt", "jsonl", "json", "csv", "parquet", "dataset"): see .formats
_BOM = b"\xef\xbb\xbf"

# OpenAI Batch request bodies: keys we map, keys that change nothing here, keys that need a neutral value.
_OPENAI_PARAMS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed", "top_k",
                  "min_p", "repetition_penalty"}
_OPENAI_PARAMS |= {"logprobs", "top_logprobs"}  # feature: logprobs (`logprobs: true` + `top_logprobs: k`)
_OPENAI_IGNORED = {"model", "user", "metadata", "store", "service_tier", "messages", "prompt", "stream_options"}
_OPENAI_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
                   "stream": (False, None), "echo": (False, None), "best_of": (1, None), "parallel_tool_calls":
                   (True, False, None), "tool_choice": ("none", None), "tools": (None,), "response_format":
                   ({"type": "text"}, None)}
# feature: structured output: `response_format` (json_schema / json_object / text) maps onto SamplingParams
_OPENAI_PARAMS |= {"response_format"}
del _OPENAI_NEUTRAL["response_format"]


def detect_format(path: str | Path, input_format: str | None = None) -> str:
    """The input format of ``path``: ``input_format`` when given, else from the extension or the folder."""
    if input_format is not None:
        if input_format not in FORMATS:
            raise InputError(f"unknown input format {input_format!r}; use one of {', '.join(FORMATS)}.")
        return input_format
    if str(path) == "-":
        return "sniff"
    path = Path(path)
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "dataset"
        raise InputError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                         "(no dataset_info.json, state.json or dataset_dict.json).")
    return input_format_of(path) or "sniff"


def _sniff(first_line: bytes) -> str:
    stripped = first_line.lstrip(_BOM).lstrip()
    if stripped.startswith(b"PAR1"):
        return "parquet"
    if stripped.startswith(b"{"):
        return "jsonl"
    if stripped.startswith(b"["):
        return "json"
    return "txt"


def _lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, str | InputError]]:
    """(line number, decoded line without its ``\\n``/``\\r``) for every ``\\n``-separated line."""
    for number, raw in enumerate(stream, 1):
        if number == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, InputError(f"{name}:{number}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                                     f"{err.start + 1}); save the file as UTF-8.")
            continue
        yield number, text.rstrip("\n").removesuffix("\r")


def _txt_rows(stream: BinaryIO, name: str) -> Iterator[tuple[str, Any]]:
    for number, text in _lines(stream, name):
        if isinstance(text, InputError) or text.strip():
            yield f"{name}:{number}", text


def _jsonl_rows(stream: BinaryIO, name: str) -> Iterator[tuple[str, Any]]:
    for number, text in _lines(stream, name):
        where = f"{name}:{number}"
        if isinstance(text, InputError):
            yield where, text
        elif text.strip():
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, InputError(f"{where}: invalid JSON ({err.msg} at column {err.colno}).")


def _json_rows(data: bytes, name: str) -> Iterator[tuple[str, Any]]:
    if data.startswith(_BOM):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{name}:{line}: not valid UTF-8; save the file as UTF-8.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines in a .json file
            yield from _jsonl_rows(io.BytesIO(data), name)
            return
        raise InputError(f"{name}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(value, list):
        raise InputError(f"{name}: a .json input must hold a list of records, got a {type(value).__name__}.")
    for position, item in enumerate(value):
        yield f"{name}[{position}]", item


def _csv_rows(stream: BinaryIO, name: str) -> Iterator[tuple[str, Any]]:
    state = {"line": 0}

    def decoded() -> Iterator[str]:
        for number, raw in enumerate(stream, 1):
            state["line"] = number
            if number == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{name}:{number}: not valid UTF-8; save the file as UTF-8.") from None

    reader = csv.DictReader(decoded())
    try:
        reader.fieldnames  # noqa: B018 - reads the header, so that line_num counts from there
        last = reader.line_num
        for row in reader:
            where = f"{name}:{last + 1}"  # the line where the record starts
            last = reader.line_num
            if None in row:
                yield where, InputError(f"{where}: more values than the header has columns.")
            else:
                yield where, {key: value for key, value in row.items()}
    except csv.Error as err:
        raise InputError(f"{name}:{state['line']}: invalid CSV ({err}).") from None


def _parquet_rows(source: Any, name: str, batch_rows: int = 1024) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{name}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(source)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors vary
        raise InputError(f"{name}: not a readable parquet file ({err}).") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for item in batch.to_pylist():
            yield f"{name}:row {row}", item
            row += 1


def _dataset_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{name}: reading a datasets folder needs the datasets library: pip install datasets"
                         ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise InputError(f"{name}: a DatasetDict with splits {', '.join(splits)}; pass the folder of one "
                             f"split (e.g. {name}/{splits[0]}).")
        loaded = loaded[splits[0]]
    row = 0  # arrow batches: the python rows without decoding media (an Image column gives {"bytes", "path"})
    for batch in loaded.with_format("arrow").iter(batch_size=1024):
        for item in batch.to_pylist():
            yield f"{name}:row {row}", item
            row += 1


def _openai_record(index: int, raw: dict, where: str, base: str | os.PathLike | None = None) -> InputRecord:
    body = raw["body"]
    url = raw.get("url", "/v1/chat/completions")
    request = OpenAIRequest(url=str(url), method=str(raw.get("method", "POST")), model=body.get("model"))
    custom_id = raw["custom_id"]
    if not isinstance(custom_id, str):
        raise InputError(f"{where}: custom_id must be a string, got {custom_id!r}.")
    if "messages" in body:
        prompt: Any = validate_messages(body["messages"], where, base=base)
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InputError(f"{where}: body.prompt must be a string (one prompt per request line), got {prompt!r}.")
    else:
        raise InputError(f"{where}: OpenAI batch request {custom_id!r} has neither body.messages nor body.prompt.")
    given: dict[str, Any] = {}
    for key, value in body.items():
        if key in _OPENAI_IGNORED:
            continue
        if key in _OPENAI_NEUTRAL:
            if value not in _OPENAI_NEUTRAL[key]:
                raise InputError(f"{where}: request {custom_id!r}: body.{key}={value!r} is not supported here "
                                 "(drop it, or give it its neutral value).")
            continue
        if key not in _OPENAI_PARAMS:
            raise InputError(f"{where}: request {custom_id!r}: body.{key} is not supported here; supported: "
                             f"{', '.join(sorted(_OPENAI_PARAMS | _OPENAI_IGNORED))}.")
        given[key] = value
    try:  # the same parameters, aliases and checks as a record's or a prompt's own
        params = SamplingParams.from_dict(given, f"{where}: request {custom_id!r}", per_prompt=True).to_dict()
    except ValueError as err:
        raise InputError(str(err)) from None
    fields = {k: v for k, v in raw.items() if k not in ("custom_id", "body", "method", "url")}
    return InputRecord(index=index, prompt=prompt, params=params, fields=fields, custom_id=custom_id, source=where,
                       openai=request)


def _is_openai(raw: Any) -> bool:
    return isinstance(raw, dict) and "custom_id" in raw and isinstance(raw.get("body"), dict)


def make_record(index: int, raw: Any, where: str, *, prompt_field: str | None = None,
                messages_field: str | None = None, from_text: bool = False,
                base: str | os.PathLike | None = None) -> InputRecord:
    """One :class:`InputRecord` from a parsed row (a string for .txt, a dict otherwise); relative image paths
    are resolved against ``base`` (the input file's folder; default: the current directory)."""
    if isinstance(raw, str) and not from_text:  # .txt line or a bare JSON string
        return InputRecord(index=index, prompt=raw, source=where)
    if _is_openai(raw):
        return _openai_record(index, raw, where, base)
    if not isinstance(raw, dict):
        raise InputError(f"{where}: record {index} is a {type(raw).__name__}; expected an object with a "
                         f"\"prompt\" field (or a string).")
    if messages_field is not None:
        key = messages_field
    elif prompt_field is not None:
        key = prompt_field
    else:
        key = next((k for k in ("prompt", "text", "messages") if k in raw), None)
    if key is None or key not in raw:
        wanted = key or prompt_field or "prompt"
        have = ", ".join(map(str, raw)) or "none"
        raise InputError(f"{where}: record {index} has no \"{wanted}\" field" +
                         ("" if key else " (nor \"text\" or \"messages\")") +
                         f"; its fields: {have}. Pass --prompt-field NAME (or --messages-field NAME).")
    value = raw[key]
    if messages_field is not None or isinstance(value, list):
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InputError(f"{where}: record {index}: field \"{key}\" is not a JSON message list.") from None
        prompt: Any = validate_messages(value, f"{where}: record {index}", base=base)
    elif isinstance(value, str):
        prompt = value
    else:
        raise InputError(f"{where}: record {index}: field \"{key}\" must be a string, got "
                         f"{type(value).__name__} {value!r:.60}.")
    images, carried = parse_images({k: v for k, v in raw.items() if k != key}, f"{where}: record {index}",
                                   base=base, from_text=from_text)
    params, fields = split_params(raw, f"{where}: record {index}", from_text=from_text, exclude=(key,))
    for name, value in carried.items():  # the image field as carried: paths and URLs, not bytes or payloads
        if value is None:
            fields.pop(name, None)
        elif name in fields:
            fields[name] = value
    custom_id = fields.get("custom_id")
    return InputRecord(index=index, prompt=prompt, params=params, fields=fields,
                       custom_id=custom_id if isinstance(custom_id, str) else None, source=where, images=images)


def _open_rows(path: str | Path, fmt: str, stdin: BinaryIO | None = None) -> tuple[Iterator[tuple[str, Any]], str]:
    name = "<stdin>" if str(path) == "-" else str(path)
    if str(path) == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
    elif fmt == "dataset":
        return _dataset_rows(Path(path), name), fmt
    else:
        if not Path(path).exists():
            raise InputError(f"{name}: no such file.")
        stream = open(path, "rb")  # noqa: SIM115 - closed by the generator below
    if fmt == "sniff":
        peeked = b""
        first = stream.readline()
        while first and not first.strip(_BOM + b" \t\r\n"):
            peeked += first
            first = stream.readline()
        fmt = _sniff(first)
        stream = _Chain(peeked + first, stream)
    if fmt == "parquet":
        source = io.BytesIO(stream.read()) if str(path) == "-" else path
        if str(path) != "-":
            stream.close()
        return _parquet_rows(source, name), fmt
    if fmt == "json":
        data = stream.read()
        if str(path) != "-":
            stream.close()
        return _json_rows(data, name), fmt
    reader = {"txt": _txt_rows, "jsonl": _jsonl_rows, "csv": _csv_rows}[fmt]

    def rows() -> Iterator[tuple[str, Any]]:
        try:
            yield from reader(stream, name)
        finally:
            if str(path) != "-":
                stream.close()

    return rows(), fmt


class _Chain(io.RawIOBase):
    """Bytes already read, then the rest of a stream (to sniff stdin without reading it all)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head = io.BytesIO(head)
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.head.read(len(buffer)) or self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __iter__(self):
        yield from self.head
        yield from self.rest

    def close(self) -> None:
        if self.rest is not sys.stdin.buffer:
            self.rest.close()
        super().close()


def input_folder(path: str | Path) -> str | None:
    """The folder relative image paths of ``path``'s records are resolved against: the file's folder (a
    datasets folder: itself), None (the current directory) for stdin."""
    if str(path) == "-":
        return None
    resolved = Path(path).resolve()
    return str(resolved if resolved.is_dir() else resolved.parent)


def read_records(
    path: str | Path,
    *,
    input_format: str | None = None,
    prompt_field: str | None = None,
    messages_field: str | None = None,
    limit: int | None = None,
    on_invalid: Callable[[InputError], None] | None = None,
    stdin: BinaryIO | None = None,
) -> Iterator[InputRecord]:
    """Yield the records of ``path`` (``"-"``: stdin) one by one; see the module docstring.

    Raises :class:`InputError` at the first bad line or record, naming the file and line; with
    ``on_invalid``, bad records are passed to it instead and skipped (their index is still used up).

    Example:
        >>> for record in read_records("prompts.jsonl", limit=2):                    # doctest: +SKIP
        ...     print(record.index, record.prompt, record.params, record.fields)
    """
    fmt = detect_format(path, input_format)
    rows, fmt = _open_rows(path, fmt, stdin)
    from_text = fmt == "csv"
    base = input_folder(path)
    index = 0
    for where, raw in rows:
        if limit is not None and index >= limit:
            break
        try:
            if isinstance(raw, InputError):
                raise raw
            if fmt == "txt":
                record = InputRecord(index=index, prompt=raw, source=where)
            else:
                record = make_record(index, raw, where, prompt_field=prompt_field, messages_field=messages_field,
                                     from_text=from_text, base=base)
        except InputError as err:
            if on_invalid is None:
                raise
            on_invalid(err)
            index += 1
            continue
        index += 1
        yield record


def read_rows(path: str | Path, *, input_format: str | None = None, limit: int | None = None,
              stdin: BinaryIO | None = None) -> Iterator[tuple[str, Any]]:
    """The raw rows of ``path`` as ``(where, value)``: parsed JSON values (a dict per CSV/parquet row), no
    prompt field required (``simple-generation score`` reads its ``context``/``continuation`` records so);
    a bad line raises :class:`InputError` naming it."""
    rows, _ = _open_rows(path, detect_format(path, input_format), stdin)
    for count, (where, raw) in enumerate(rows):
        if limit is not None and count >= limit:
            break
        if isinstance(raw, InputError):
            raise raw
        yield where, raw


class UniqueCustomIds:
    """Checks that the ``custom_id``s of OpenAI Batch request lines are unique (the format requires it: the
    answers are matched on them). Memory: one entry per request."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def check(self, record: InputRecord) -> InputError | None:
        """An error naming both lines when ``record`` repeats an earlier request's custom_id, else None."""
        if record.openai is None or record.custom_id is None:
            return None
        first = self._seen.setdefault(record.custom_id, record.source)
        if first == record.source:
            return None
        return InputError(f"{record.source}: custom_id {record.custom_id!r} is already used at {first}; the "
                          "custom_ids of an OpenAI Batch file must be unique.")


def windows(records: Iterable[InputRecord], size: int = 10_000) -> Iterator[list[InputRecord]]:
    """Consecutive lists of at most ``size`` records."""
    window: list[InputRecord] = []
    for record in records:
        window.append(record)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


@dataclass
class ScanReport:
    """What a validation pass over an input found (``scan``), without loading any model."""

    path: str
    format: str = ""
    records: int = 0
    chat: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    duplicates: int = 0                       # records whose (prompt, params) appeared earlier
    with_params: Counter = field(default_factory=Counter)  # parameter name -> records that set it
    duplicate_custom_ids: int = 0
    prompt_chars: list[int] = field(default_factory=lambda: [0, 0, 0])  # min, total, max

    @property
    def ok(self) -> bool:
        return self.error_count == 0


def record_digest(record: InputRecord) -> bytes:
    """A short digest of what makes two records the same request: the prompt, its parameters and its images
    (by :func:`~.records.image_identity`: paths and URLs by name, bytes by content)."""
    request = [record.prompt, record.params] + ([record.images] if record.images else [])
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, default=image_identity)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def scan(path: str | Path, *, input_format: str | None = None, prompt_field: str | None = None,
         messages_field: str | None = None, limit: int | None = None, max_errors: int = 20,
         visit: Callable[[InputRecord], None] | None = None, stdin: BinaryIO | None = None) -> ScanReport:
    """Read the whole input once and report counts, exact duplicates and every error (the first ``max_errors``
    listed). ``visit`` sees each valid record (e.g. to count tokens). Memory: 16 bytes per distinct record."""
    report = ScanReport(path=str(path))

    def invalid(err: InputError) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(str(err))

    seen: set[bytes] = set()
    custom_ids: set[str] = set()
    unique = UniqueCustomIds()
    try:
        report.format = detect_format(path, input_format)
        for record in read_records(path, input_format=input_format, prompt_field=prompt_field,
                                   messages_field=messages_field, limit=limit, on_invalid=invalid, stdin=stdin):
            repeated = unique.check(record)
            if repeated is not None:
                invalid(repeated)
                continue
            report.records += 1
            if not isinstance(record.prompt, str):
                report.chat += 1
            digest = record_digest(record)
            if digest in seen:
                report.duplicates += 1
            else:
                seen.add(digest)
            if record.custom_id is not None:
                if record.custom_id in custom_ids:
                    report.duplicate_custom_ids += 1
                custom_ids.add(record.custom_id)
            report.with_params.update(record.params.keys())
            chars = len(prompt_text(record.prompt))
            low, total, high = report.prompt_chars
            report.prompt_chars = [chars if report.records == 1 else min(low, chars), total + chars, max(high, chars)]
            if visit is not None:
                visit(record)
    except InputError as err:  # a whole-file error (not one record): nothing after it can be read
        invalid(err)
    return report
