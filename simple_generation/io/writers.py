"""Write output records in input order while results arrive in any order.

:class:`OrderedWriter` buffers a record that comes early and writes every record as soon as all earlier
indices are written, flushing after each write: a JSONL or CSV output is always a valid prefix of the
final file (a killed run leaves whole records only). Parquet is written in row groups to ``<output>.partial``
beside the output, and renamed to the output when closed; an older output is removed when the writer opens,
so a run killed before its end never leaves another run's complete file looking like its result.

Text that UTF-8 cannot encode (a lone surrogate, e.g. ``"\\udfff"`` read from a JSON escape in a carried
field) never stops a writer: a JSONL line holding one is written with ASCII escapes (``\\udfff``, read back
as the same string), and a CSV or parquet cell gets the escape as text.

Formats: ``jsonl`` (default), ``csv``, ``parquet`` and ``openai-batch`` (OpenAI Batch API output lines:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from .formats import OUTPUT_FORMATS, output_format_of


def _escape(text: str) -> str:
    """``text``, with characters UTF-8 cannot encode (lone surrogates) written as ``\\udfff`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_line(value: Any) -> str:
    """One JSON line; ASCII-escaped when it holds a lone surrogate (still valid JSON, read back the same)."""
    line = json.dumps(value, ensure_ascii=False)
    if _escape(line) is not line:
        line = json.dumps(value, ensure_ascii=True)
    return line + "\n"


def output_format_for(path: str | Path | None, output_format: str | None = None) -> str:
    """``output_format`` when given, else from the extension (case-insensitive), else ``jsonl``."""
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}.")
        return output_format
    if path is None or str(path) == "-":
        return "jsonl"
    return output_format_of(path) or "jsonl"


def _short_hash(*parts: Any, size: int = 12) -> str:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"),
                           digest_size=size).hexdigest()


def _token_bytes(token: str) -> list[int] | None:
    """A token's UTF-8 bytes; None when its text is not whole characters (a piece of a character decodes to
    U+FFFD on its own)."""
    return None if "\ufffd" in token else list(token.encode("utf-8", "surrogatepass"))


def openai_logprobs(entries: list[dict[str, Any]] | None, *, chat: bool = True) -> dict[str, Any] | None:
    """An answer's logprobs (an output record's ``logprobs`` entries) in OpenAI's shape: chat completions'
    ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}``; legacy
    completions' ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``. (feature:
    logprobs)

    Example:
        >>> openai_logprobs([{"token_id": 5, "token": "Hi", "logprob": -0.5, "top_logprobs": []}])["content"]
        [{'token': 'Hi', 'logprob': -0.5, 'bytes': [72, 105], 'top_logprobs': []}]
    """
    if entries is None:
        return None
    if chat:
        return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _token_bytes(e["token"]),
                             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                                               "bytes": _token_bytes(t["token"])} for t in e["top_logprobs"]]}
                            for e in entries], "refusal": None}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def openai_batch_line(record: dict[str, Any], *, chat: bool = True, model: str | None = None,
                      created: int | None = None) -> dict[str, Any]:
    """An OpenAI Batch output line for an output record (see :func:`..records.output_record`).

    A record with an ``error`` (or not generated because it is a near-duplicate) gets ``response: null``
    and ``error: {"code", "message"}``; the others a 200 response whose body is a ``chat.completion`` (or
    ``text_completion`` for ``/v1/completions`` requests) with one choice per answer and ``usage``.
    Ids are derived from the custom_id and index, so a rerun writes the same ids.
    """
    custom_id = record.get("custom_id")
    if custom_id is None:
        custom_id = f"request-{record['index']}"
    line_id = f"batch_req_{_short_hash(custom_id, record['index'])}"
    if record.get("error") is not None or record.get("duplicate_of") is not None:
        if record.get("error") is not None:
            error = {"code": "generation_error", "message": str(record["error"])}
        else:
            error = {"code": "near_duplicate",
                     "message": f"not generated: a near-duplicate of the request at index {record['duplicate_of']}"}
        return {"id": line_id, "custom_id": custom_id, "response": None, "error": error}
    answers = record.get("answer")
    answers = answers if isinstance(answers, list) else [answers]
    reasons = record.get("finish_reason")
    reasons = reasons if isinstance(reasons, list) else [reasons] * len(answers)
    logprobs = record.get("logprobs")  # feature: logprobs (a list per answer; one answer's list when n == 1)
    logprobs = [None] * len(answers) if logprobs is None else [logprobs] if len(answers) == 1 else logprobs
    thoughts = record.get("reasoning")  # feature: reasoning: as vLLM's and DeepSeek's `reasoning_content`
    thoughts = thoughts if isinstance(thoughts, list) else [thoughts] * len(answers)
    choices = []
    for position, (text, reason) in enumerate(zip(answers, reasons)):
        reason = "length" if reason == "length" else "stop"
        if chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if thoughts[position] is not None:
                message["reasoning_content"] = thoughts[position]
            choices.append({"index": position, "message": message, "logprobs": openai_logprobs(logprobs[position]),
                            "finish_reason": reason})
        else:
            choices.append({"text": text, "index": position,
                            "logprobs": openai_logprobs(logprobs[position], chat=False), "finish_reason": reason})
    prompt_tokens = record.get("prompt_tokens") or 0
    completion_tokens = record.get("completion_tokens") or 0
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{_short_hash(custom_id, record['index'], 'body')}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }
    response = {"status_code": 200, "request_id": f"req_{_short_hash(custom_id, record['index'], 'req', size=16)}",
                "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


class OrderedWriter:
    """Write records in index order as they arrive: ``add(index, record)`` in any order, ``close()`` at the end.

    ``path`` ``"-"`` or None writes to stdout (not for parquet). ``start`` is the first index expected.
    For ``openai-batch``, ``add`` also takes ``chat=`` and ``model=`` (what the request line said).

    Example:
        >>> with OrderedWriter("answers.jsonl") as writer:                           # doctest: +SKIP
        ...     writer.add(1, {"index": 1, "answer": "b"})   # buffered
        ...     writer.add(0, {"index": 0, "answer": "a"})   # writes 0, then 1
    """

    def __init__(self, path: str | Path | None, fmt: str | None = None, *, start: int = 0,
                 row_group_size: int = 1000, model: str | None = None):
        self.format = output_format_for(path, fmt)
        self.path = None if path is None or str(path) == "-" else Path(path)
        if self.path is None and self.format == "parquet":
            raise ValueError("parquet output needs a file (--output answers.parquet), not stdout.")
        self.next_index = start
        self.written = 0
        self.model = model
        self.created = int(time.time())
        self._pending: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._row_group_size = row_group_size
        self._rows: list[dict[str, Any]] = []
        self._parquet = None
        self._schema = None
        self._csv: csv.DictWriter | None = None
        self._csv_columns: list[str] | None = None
        self._dropped: set[str] = set()
        self._file: IO[str] | None = None
        self._partial: Path | None = None
        if self.format == "parquet":
            self._partial = self.path.with_name(self.path.name + ".partial")
            for stale in (self.path, self._partial):
                if stale.is_file() or stale.is_symlink():
                    stale.unlink()
        else:
            self._file = sys.stdout if self.path is None else open(  # noqa: SIM115 - closed in close()
                self.path, "w", encoding="utf-8", newline="" if self.format == "csv" else None)

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Records received but waiting for an earlier index."""
        return len(self._pending)

    def add(self, index: int, record: dict[str, Any], **options: Any) -> None:
        """Take record ``index``; write it and every buffered record that now follows without a gap."""
        if index < self.next_index or index in self._pending:
            raise ValueError(f"record {index} was already added.")
        self._pending[index] = (record, options)
        while self.next_index in self._pending:
            record, options = self._pending.pop(self.next_index)
            self._write(record, options)
            self.next_index += 1
            self.written += 1
        if self._file is not None:
            self._file.flush()

    def _write(self, record: dict[str, Any], options: dict[str, Any]) -> None:
        if self.format == "jsonl":
            self._file.write(_json_line(record))
        elif self.format == "openai-batch":
            line = openai_batch_line(record, chat=options.get("chat", True), model=options.get("model", self.model),
                                     created=self.created)
            self._file.write(_json_line(line))
        elif self.format == "csv":
            self._write_csv(record)
        else:
            self._rows.append(record)
            if len(self._rows) >= self._row_group_size:
                self._flush_parquet()

    def _write_csv(self, record: dict[str, Any]) -> None:
        if self._csv is None:
            self._csv_columns = list(record)
            self._csv = csv.DictWriter(self._file, fieldnames=self._csv_columns, extrasaction="ignore")
            self._csv.writerow({k: _escape(str(k)) for k in self._csv_columns})
        extra = set(record) - set(self._csv_columns) - self._dropped
        if extra:
            self._dropped |= extra
            import logging

            logging.getLogger("simple_generation").warning(
                "CSV output: column(s) %s first appear at record %s and are not in the header; they are left out "
                "(use JSONL output for records with varying fields).", ", ".join(sorted(extra)), record.get("index"))
        self._csv.writerow({k: _cell(v) for k, v in record.items() if k in self._csv_columns})

    def _flush_parquet(self) -> None:
        if not self._rows:
            return
        import pyarrow.parquet as pq

        rows = [{_escape(str(k)): _parquet_value(v) for k, v in row.items()} for row in self._rows]
        self._rows = []
        table = parquet_table(rows, self._schema)
        if self._schema is None:
            self._schema = table.schema
            self._parquet = pq.ParquetWriter(str(self._partial), self._schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        """Write what can be written (a gap stays a gap: buffered later records are not written) and close."""
        if self.format == "parquet":
            self._flush_parquet()
            if self._parquet is not None:
                self._parquet.close()
                self._parquet = None
                os.replace(self._partial, self.path)
            elif self.path is not None and self.written == 0 and not self.path.exists():
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({"index": pa.array([], pa.int64())}), str(self.path))
        elif self._file is not None:
            if self._file is sys.stdout:
                self._file.flush()
            else:
                self._file.close()
            self._file = None


def parquet_table(rows: list[dict[str, Any]], schema: Any = None) -> Any:
    """Records as one Arrow table, whatever their values' types (the one place mixed columns are handled).

    Without ``schema`` (a file's first row group): a column per key seen in any row, in first-seen order; a
    column whose values mix types (a string answer and a list of answers) holds them as JSON text; a column of
    nulls only is a string column. With ``schema`` (the later row groups of the same file): the values are
    fitted to it (non-strings in a string column as JSON text, a scalar in a list column as a one-item list);
    keys the schema lacks are left out.

    Example:
        >>> parquet_table([{"answer": "a"}, {"answer": ["b", "c"]}]).column("answer").to_pylist()
        ['a', '["b", "c"]']
    """
    import pyarrow as pa

    if schema is None:
        names: dict[str, None] = {}
        for row in rows:
            names.update(dict.fromkeys(row))
        fields = []
        for name in names:
            try:
                kind = pa.array([row.get(name) for row in rows]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types (e.g. str and list): kept as JSON text
                kind = pa.string()
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
        schema = pa.schema(fields)
    data = {}
    for arrow_field in schema:
        values = [row.get(arrow_field.name) for row in rows]
        if pa.types.is_string(arrow_field.type) or pa.types.is_large_string(arrow_field.type):
            values = [v if v is None or isinstance(v, str) else _escape(json.dumps(v, ensure_ascii=False, default=str))
                      for v in values]
        elif pa.types.is_list(arrow_field.type):
            values = [v if v is None or isinstance(v, list) else [v] for v in values]
        data[arrow_field.name] = values
    return pa.Table.from_pydict(data, schema=schema)


def _cell(value: Any) -> Any:
    """A CSV cell: lists/dicts (answers when n > 1, message lists) as JSON, None as an empty cell."""
    if isinstance(value, (list, dict)):
        return _escape(json.dumps(value, ensure_ascii=False))
    return _escape(value) if isinstance(value, str) else value


def _parquet_value(value: Any) -> Any:
    """Message lists (prompts of chat records) as JSON strings; other values as they are (strings escaped)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _escape(json.dumps(value, ensure_ascii=False))
    if isinstance(value, dict):
        return _escape(json.dumps(value, ensure_ascii=False))
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list):
        return [_escape(v) if isinstance(v, str) else v for v in value]
    return value
