"""The one table of file formats: which suffix means which format, what can be read, what can be written.

Every part that looks at a file name asks here: the readers (``detect_format``), the writers
(``output_format_for``), the web app's upload check and the Ray job's readers.

Example:
    >>> input_format_of("prompts.JSONL"), output_format_of("answers.json"), output_format_of("out.txt")
    ('jsonl', 'jsonl', None)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileFormat:
    """One format: its name (``--input-format``/``--output-format``), the suffixes that mean it (the first is
    the usual one), whether it can be read and written, and what a file with its suffix is written as when
    the format itself cannot be written (``answers.json`` gets JSON Lines)."""

    name: str
    suffixes: tuple[str, ...]
    readable: bool
    writable: bool
    written_as: str | None = None


TABLE: tuple[FileFormat, ...] = (
    FileFormat("txt", (".txt", ".text"), readable=True, writable=False),
    FileFormat("jsonl", (".jsonl", ".ndjson"), readable=True, writable=True),
    FileFormat("json", (".json",), readable=True, writable=False, written_as="jsonl"),
    FileFormat("csv", (".csv",), readable=True, writable=True),
    FileFormat("parquet", (".parquet", ".pq"), readable=True, writable=True),
    FileFormat("dataset", (), readable=True, writable=False),  # a folder written by datasets' save_to_disk
    FileFormat("openai-batch", (), readable=False, writable=True),  # OpenAI Batch output lines (by name only)
)
BY_NAME = {f.name: f for f in TABLE}
INPUT_FORMATS = tuple(f.name for f in TABLE if f.readable)
OUTPUT_FORMATS = tuple(f.name for f in TABLE if f.writable)
# suffix -> the format a file with that suffix is read as / written as
INPUT_SUFFIXES = {suffix: f.name for f in TABLE if f.readable for suffix in f.suffixes}
OUTPUT_SUFFIXES = {suffix: f.name if f.writable else f.written_as for f in TABLE
                   for suffix in f.suffixes if f.writable or f.written_as}


def input_format_of(path: str | Path) -> str | None:
    """The format a file is read as, from its suffix (case-insensitive); None when the suffix says nothing."""
    return INPUT_SUFFIXES.get(Path(path).suffix.lower())


def output_format_of(path: str | Path) -> str | None:
    """The format a file is written as, from its suffix (case-insensitive); None when the suffix says nothing."""
    return OUTPUT_SUFFIXES.get(Path(path).suffix.lower())


def usual_suffixes(names: tuple[str, ...]) -> tuple[str, ...]:
    """The usual suffix of each named format (``("txt", "csv")`` -> ``(".txt", ".csv")``)."""
    return tuple(BY_NAME[name].suffixes[0] for name in names)
