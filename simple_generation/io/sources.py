"""Record sources for the job layer: anything with ``records()`` yielding :class:`InputRecord` in input order.

A source can be read more than once (validation, the near-duplicate pre-pass, then generation), and
``record.index`` is the record's position in the whole input. Two are here:

- :class:`InputSource`: ``--prompt`` texts, then a file (any input format, or ``-``: stdin, copied once to an
  anonymous temporary file so that it can be read again), with an optional ``limit``;
- :class:`ListSource`: records (or prompts) already in memory.

Example:
    >>> source = ListSource(["Hello", "2 + 2?"])
    >>> [(r.index, r.prompt) for r in source.records()]
    [(0, 'Hello'), (1, '2 + 2?')]
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .readers import ScanReport, UniqueCustomIds, read_records, record_digest
from .records import InputError, InputRecord, prompt_problem


class _PositionalReader(io.RawIOBase):
    """Reads a file descriptor from the start with its own position (several readers never share one)."""

    def __init__(self, fd: int):
        self._fd, self._position = fd, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if hasattr(os, "pread"):
            data = os.pread(self._fd, len(buffer), self._position)
        else:  # Windows: readers run one after the other, so seeking first is enough
            os.lseek(self._fd, self._position, os.SEEK_SET)
            data = os.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class Spool:
    """A stream (stdin) copied to an anonymous temporary file, to be read several times. The file never has
    a name on POSIX (and is deleted on close on Windows): nothing of the input stays in the temp folder after
    any exit, SIGTERM and kill -9 included."""

    def __init__(self, stream: BinaryIO):
        self._file = tempfile.TemporaryFile(prefix="simple-generation-stdin-")
        try:
            shutil.copyfileobj(stream, self._file)
            self._file.flush()
        except BaseException:
            self._file.close()
            raise

    def open(self) -> BinaryIO:
        """A new reader from the start of the copy."""
        return io.BufferedReader(_PositionalReader(self._file.fileno()))

    def close(self) -> None:
        self._file.close()


class InputSource:
    """The records of a run: the ``prompts`` texts first (sources ``--prompt 1``, ...), then the file ``path``
    (``"-"``: stdin, spooled on creation); at most ``limit`` records in all. Close it when done (the stdin copy).

    Example:
        >>> with InputSource(["Hi"], "prompts.jsonl", limit=100) as source:          # doctest: +SKIP
        ...     report, problems = scan_source(source)
    """

    def __init__(self, prompts: Sequence[str] = (), path: str | Path | None = None, *,
                 input_format: str | None = None, prompt_field: str | None = None,
                 messages_field: str | None = None, limit: int | None = None, stdin: BinaryIO | None = None):
        self.prompts = list(prompts)
        self.path = path
        self.input_format, self.prompt_field, self.messages_field = input_format, prompt_field, messages_field
        self.limit = limit
        self._spool = Spool(stdin if stdin is not None else sys.stdin.buffer) if str(path) == "-" else None

    @property
    def name(self) -> str:
        """How reports name the input: the file (``-`` for stdin), else ``--prompt``."""
        return str(self.path) if self.path else "--prompt"

    def records(self, on_invalid: Callable[[InputError], None] | None = None) -> Iterator[InputRecord]:
        """The records in input order; with ``on_invalid``, invalid ones go to it (their index is used up)."""
        limit = self.limit
        for position, text in enumerate(self.prompts):
            if limit is not None and position >= limit:
                return
            yield InputRecord(index=position, prompt=text, source=f"--prompt {position + 1}")
        if not self.path:
            return
        offset = len(self.prompts)
        remaining = None if limit is None else max(0, limit - offset)
        if remaining == 0:
            return
        stdin = self._spool.open() if self._spool else None
        try:
            for record in read_records(self.path, input_format=self.input_format, prompt_field=self.prompt_field,
                                       messages_field=self.messages_field, limit=remaining, on_invalid=on_invalid,
                                       stdin=stdin):
                record.index += offset
                yield record
        finally:
            if stdin is not None:
                stdin.close()

    def close(self) -> None:
        if self._spool:
            self._spool.close()

    def __enter__(self) -> InputSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ListSource:
    """Records already in memory: :class:`InputRecord` objects, or prompts (strings or message lists) that
    become records numbered from 0, in order. ``limit`` keeps the first records only."""

    def __init__(self, items: Iterable[InputRecord | str | list], *, limit: int | None = None):
        self.items = [item if isinstance(item, InputRecord) else
                      InputRecord(index=position, prompt=item, source=f"prompt {position}")
                      for position, item in enumerate(items)]
        if limit is not None:
            self.items = self.items[:limit]
        self.name = "prompts"

    def records(self, on_invalid: Callable[[InputError], None] | None = None) -> Iterator[InputRecord]:
        yield from self.items

    def __len__(self) -> int:
        return len(self.items)


def scan_source(source: Any, max_errors: int = 20) -> tuple[ScanReport, dict[int, tuple[str, str]]]:
    """Read a source once and validate it: a :class:`ScanReport` (counts, exact duplicates, every invalid
    record, the first ``max_errors`` listed) and the records whose prompt cannot be generated from (a lone
    surrogate), as ``{index: (source, reason)}``."""
    report = ScanReport(path=getattr(source, "name", "input"), format="")
    problems: dict[int, tuple[str, str]] = {}

    def invalid(err: Exception) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(str(err))

    seen: set[bytes] = set()
    custom_ids = UniqueCustomIds()
    try:
        for record in source.records(on_invalid=invalid):
            repeated = custom_ids.check(record)
            if repeated is not None:
                invalid(repeated)
                continue
            report.records += 1
            report.chat += not isinstance(record.prompt, str)
            digest = record_digest(record)
            report.duplicates += digest in seen
            seen.add(digest)
            report.with_params.update(record.params.keys())
            problem = prompt_problem(record.prompt)
            if problem is not None:
                problems[record.index] = (record.source, problem)
    except Exception as err:  # noqa: BLE001 - a whole-file error (InputError, unreadable file...)
        invalid(err)
    return report, problems
