"""The job layer: a source of records in, an ordered writer of output records out, written once.

The command line (``simple-generation run``), the web app's batch tab and the Ray job all call
:func:`run_job`; none re-implements windows, the store, near-duplicates, failures or totals. Around it:
:func:`store_path` (where a job's store lives), :func:`open_store` (opened and checked before any output
is touched or any model loads), :func:`near_duplicates` (the pre-pass) and :func:`dry_run` (the
``--dry-run`` report, no model loaded).

Nothing here imports torch: the model is the generator's business.

Example:
    >>> from simple_generation import SimpleGenerator
    >>> from simple_generation.io import OrderedWriter
    >>> gen = SimpleGenerator("/tmp/tiny-llama")                                     # doctest: +SKIP
    >>> with InputSource(path="prompts.jsonl") as source, OrderedWriter("answers.jsonl") as writer:  # doctest: +SKIP
    ...     summary = run_job(gen, source, writer, JobOptions(store=store_path(output="answers.jsonl")))
    >>> summary.records, summary.generated_tokens, summary.failures                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import output_record, prompt_text, windows
from .io.records import InputError, InputRecord, image_identity, prompt_images, prompt_problem
from .io.sources import InputSource, ListSource, Spool, scan_source

__all__ = ["DryRun", "InputSource", "JobOptions", "JobProgress", "JobSummary", "ListSource", "Spool", "dry_run",
           "is_regular_target", "near_duplicates", "open_store", "run_job", "scan_source", "store_path"]

logger = logging.getLogger("simple_generation")


@dataclass
class JobProgress:
    """Where a job stands, given to :attr:`JobOptions.on_progress` at the start and after every result."""

    done: int                 # records written (or skipped as near-duplicates/failed) so far
    total: int | None         # records in the job, when known (JobOptions.total)
    tokens: int = 0           # tokens generated so far (answers from the store not counted)
    cached: int = 0           # answers taken from the store
    seconds: float = 0.0      # since the job started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class JobOptions:
    """How :func:`run_job` runs a job. Every field has a default: ``JobOptions()`` is a plain run.

    Example:
        >>> JobOptions(store="answers.jsonl.sqlite", window_size=1000, generation={"max_new_tokens": 32})
        ... # doctest: +ELLIPSIS
        JobOptions(store='answers.jsonl.sqlite', window_size=1000, ...)
    """

    store: Any = None             # path of the SQLite store of finished answers, an open ResultStore, or None
    window_size: int = 10_000     # records read and generated at a time (memory stays flat)
    near_dedup: float | None = None  # MinHash threshold: later records this similar to an earlier one are skipped
    on_error: str = "record"      # "record": a failing prompt gets an error in its record; "raise": stop
    skip_prompt: bool = False     # answers hold the continuation only (OpenAI Batch output always does)
    output_format: str | None = None  # the writer's format ("openai-batch" changes skip_prompt, see above)
    generation: dict[str, Any] = field(default_factory=dict)  # generation keywords for generator.stream
    batch_size: int | str = "auto"  # an integer or "auto" (see SimpleGenerator.__call__)
    truncate_prompts: bool = False  # keep the end of prompts longer than the context instead of failing them
    show_progress: bool = True    # the generator's progress bar
    on_progress: Callable[[JobProgress], None] | None = None  # called at the start and after every result
    total: int | None = None      # records in the job, when known (for JobProgress.total)


@dataclass
class JobSummary:
    """What :func:`run_job` did."""

    records: int = 0              # records of the source seen
    written: int = 0              # records given to the writer (0 on ranks other than the main one)
    generated_tokens: int = 0
    cached: int = 0               # answers taken from the store
    deduplicated: int = 0         # records answered by an identical record's generation
    near_duplicates: int = 0      # records skipped as near-duplicates (their record says duplicate_of)
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (index, source, error)
    wall_time_s: float = 0.0
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None
    is_main: bool = True          # False on accelerate ranks other than 0 (they write nothing)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------- the store
def is_regular_target(path: str | Path) -> bool:
    """Whether a regular file is or can be at ``path`` (not /dev/null, a FIFO, a socket...)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def store_path(*, store: str | Path | None = None, output: str | Path | None = None, no_store: bool = False,
               cache_dir: str | Path | None = None, content: bytes | None = None, key: str = "") -> str | None:
    """Where a job keeps its store of finished answers (None: it keeps none, a rerun starts over).

    - ``no_store``: none; an explicit ``store``: that path;
    - ``cache_dir`` (the web app): ``<cache_dir>/batch-<hash>.sqlite``, the hash of the input's ``content``
      and ``key`` (the settings): the same upload with the same settings finds its store again;
    - else ``<output>.sqlite`` when the output is (or will be) a regular file: none beside /dev/null, a FIFO
      or another device (a benchmark writing to /dev/null must not time a cache).

    Example:
        >>> store_path(output="answers.jsonl"), store_path(output="/dev/null"), store_path(store="s.sqlite")
        ('answers.jsonl.sqlite', None, 's.sqlite')
    """
    if no_store:
        return None
    if store:
        return str(store)
    if cache_dir is not None:
        digest = hashlib.sha256()
        digest.update(content or b"")
        digest.update(key.encode())
        return str(Path(cache_dir) / f"batch-{digest.hexdigest()[:24]}.sqlite")
    if output and str(output) != "-" and is_regular_target(output):
        return f"{output}.sqlite"
    return None


def open_store(path: str | Path | None, *, create: bool = True):
    """The store at ``path`` opened and checked (SQLite integrity, ours, schema version), or None (no path, or
    ``create=False`` and no file there). Raises :class:`~simple_generation.store.StoreError` with a clear
    message: call it before the output is touched and before the model loads."""
    if path is None or (not create and not Path(path).exists()):
        return None
    from .store import ResultStore

    return ResultStore(path, check_integrity=True)


# ---------------------------------------------------------------------------------------------- pre-pass
def images_key(record: InputRecord) -> bytes:
    """A short digest of a record's images (its ``images`` and its messages' image parts, by
    :func:`~simple_generation.io.records.image_identity`: no decoding); ``b""`` without images."""
    images = [*(record.images or []), *prompt_images(record.prompt)]
    if not images:
        return b""
    names = "\0".join(image_identity(image) for image in images)
    return hashlib.blake2b(names.encode("utf-8", "surrogatepass"), digest_size=12).digest()


def near_duplicates(source: Any, threshold: float) -> dict[int, int]:
    """``{index: index of the earlier record it nearly duplicates}`` over a whole source (MinHash, needs
    datasketch); the first record of a group is kept.

    Images are not text: records are compared only with records that have the same images (the same sources,
    :func:`images_key`). Records without images stream through one pass as before; when some images recur, a
    second pass compares the texts of each group of records sharing them (only those texts are held)."""
    from .dedup import near_duplicates as find

    plain: list[int] = []  # indices of the records without images, in order
    counts: dict[bytes, int] = {}

    def plain_texts() -> Iterator[str]:
        for record in source.records():
            key = images_key(record)
            if key:
                counts[key] = counts.get(key, 0) + 1
                continue
            plain.append(record.index)
            yield prompt_text(record.prompt)

    found = {plain[removed]: plain[kept] for removed, kept in find(plain_texts(), threshold).items()}
    shared = {key for key, count in counts.items() if count > 1}
    counts.clear()
    if shared:
        groups: dict[bytes, list[tuple[int, str]]] = {}
        for record in source.records():
            key = images_key(record)
            if key in shared:
                groups.setdefault(key, []).append((record.index, prompt_text(record.prompt)))
        for group in groups.values():
            removed = find([text for _, text in group], threshold)
            found.update({group[r][0]: group[k][0] for r, k in removed.items()})
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------- the job
def _writer_options(record: InputRecord) -> dict[str, Any]:
    if record.openai is None:
        return {}
    return {"chat": record.openai.chat, "model": record.openai.model}


def _groups(records: list[InputRecord], skip_prompt: bool) -> dict[tuple[bool, bool], list[InputRecord]]:
    """Records by (skip_prompt, plain): OpenAI ``/v1/completions`` requests are plain text completions (no
    template or chat template, whatever the generator's), OpenAI's shape."""
    groups: dict[tuple[bool, bool], list[InputRecord]] = {}
    for record in records:
        plain = record.openai is not None and not record.openai.chat and isinstance(record.prompt, str)
        groups.setdefault((skip_prompt, plain), []).append(record)
    return groups


class _Accounts:
    """Counts a job as results come: the summary, and the progress given to ``on_progress``."""

    def __init__(self, options: JobOptions, summary: JobSummary):
        self.options, self.summary = options, summary
        self.progress = JobProgress(done=0, total=options.total)
        self.started = time.perf_counter()

    def tick(self, result: Any = None) -> None:
        self.progress.done += 1
        if result is not None:
            if getattr(result, "cached", False):
                self.progress.cached += 1
            else:
                self.progress.tokens += getattr(result, "completion_tokens", 0) or 0
        self.report()

    def report(self) -> None:
        if self.options.on_progress is not None:
            self.progress.seconds = time.perf_counter() - self.started
            self.options.on_progress(self.progress)

    def add_run(self, run: Any) -> None:
        summary = self.summary
        summary.generated_tokens += getattr(run, "generated_tokens", 0) or 0
        summary.cached += getattr(run, "cached", 0) or 0
        summary.deduplicated += getattr(run, "deduplicated", 0) or 0
        for name in ("energy_kwh", "emissions_kg_co2eq"):
            value = getattr(run, name, None)
            if value is not None:
                setattr(summary, name, (getattr(summary, name) or 0.0) + value)


def run_job(generator: Any, source: Any, writer: Any, options: JobOptions | None = None) -> JobSummary:
    """Generate an output record for every record of ``source`` and give them to ``writer`` in input order.

    Args:
        generator: anything with ``stream(prompts, *, params, store, on_error, skip_prompt, show_progress_bar,
            batch_size, truncate_prompts, plain_prompts, **generation)`` yielding results (``.index`` = the
            position in ``prompts``, any order) and ``last_run`` after the stream ends; a
            ``distribution.is_main`` of False (an accelerate rank other than 0) writes nothing.
            :class:`~simple_generation.SimpleGenerator` is one.
        source: anything with ``records()`` yielding :class:`~simple_generation.io.InputRecord` in input order
            (``index`` = position in the input), readable more than once (see :mod:`simple_generation.io.sources`).
        writer: anything with ``add(index, record, **options)`` writing in index order
            (:class:`~simple_generation.io.OrderedWriter`), or None; the caller opens and closes it.
        options: see :class:`JobOptions`.

    Records are read and generated a window at a time. A record the near-duplicate pre-pass removes gets a
    record with ``duplicate_of``; a prompt that cannot be generated from (a lone surrogate) or that fails gets
    a record with its ``error`` (listed in ``JobSummary.failures``; ``on_error="raise"`` raises instead). With
    a store, every answer is committed as it finishes and a rerun generates only what the store lacks.

    Example:
        >>> summary = run_job(gen, ListSource(["Hi", "2 + 2?"]), writer, JobOptions())   # doctest: +SKIP
    """
    options = options or JobOptions()
    distribution = getattr(generator, "distribution", None)
    is_main = getattr(distribution, "is_main", True)
    if not is_main:
        writer = None
    summary = JobSummary(is_main=is_main)
    store, own_store = options.store, isinstance(options.store, (str, os.PathLike))
    if own_store:
        store = open_store(store)
    accounts = _Accounts(options, summary)
    reasoning = _uses_reasoning(generator, options.generation)  # feature: reasoning: a `reasoning` field
    skip_prompt = options.skip_prompt or options.output_format == "openai-batch"
    call: dict[str, Any] = dict(store=store, on_error=options.on_error, batch_size=options.batch_size,
                                show_progress_bar=options.show_progress, truncate_prompts=options.truncate_prompts,
                                **options.generation)

    def write(record: InputRecord, out: dict[str, Any]) -> None:
        if writer is not None:
            writer.add(record.index, out, **_writer_options(record))
            summary.written += 1

    def failed(record: InputRecord, error: str) -> None:
        summary.failures.append((record.index, record.source, error))

    warned_images = False
    try:
        near = near_duplicates(source, options.near_dedup) if options.near_dedup is not None else {}
        summary.near_duplicates = len(near)
        accounts.report()
        for window in windows(source.records(), options.window_size):
            summary.records += len(window)
            todo = []
            for record in window:
                problem = None if record.index in near else prompt_problem(record.prompt)
                if record.index in near:
                    write(record, output_record(record, duplicate_of=near[record.index], reasoning=reasoning))
                    accounts.tick()
                elif problem is not None:
                    if options.on_error == "raise":
                        raise InputError(f"{record.source}: {problem}")
                    failed(record, problem)
                    write(record, output_record(record, {"error": problem}, reasoning=reasoning))
                    accounts.tick()
                else:
                    todo.append(record)
            for (group_skip_prompt, plain), group in _groups(todo, skip_prompt).items():
                params = [record.params or None for record in group]
                images = [record.images for record in group]  # the sources; decoded by the generator
                if any(images) and getattr(generator, "vision", True) is None:  # a text model: fields carried only
                    if not warned_images:
                        logger.warning("The input has image fields and %s takes text only: the images are not "
                                       "read (their paths are carried into the output).",
                                       getattr(generator, "model_name_or_path", "this model"))
                        warned_images = True
                    images = []
                results = generator.stream([record.prompt for record in group],
                                           params=params if any(params) else None,
                                           **({"images": images} if any(images) else {}),
                                           **call, skip_prompt=group_skip_prompt, plain_prompts=plain)
                for result in results:
                    record = group[result.index]
                    if result.error is not None and result.error.startswith(f"texts[{result.index}]"):
                        # the generator names the prompt by its place in this window: the record is the place
                        result.error = result.error[len(f"texts[{result.index}]"):].lstrip(",: ")
                    out = output_record(record, result, reasoning=reasoning)
                    if out["error"] is not None:
                        failed(record, str(out["error"]))
                    write(record, out)
                    accounts.tick(result)
                accounts.add_run(generator.last_run)
    finally:
        if own_store and store is not None:
            store.close()
        summary.wall_time_s = time.perf_counter() - accounts.started
    return summary


def _uses_reasoning(generator: Any, generation: dict[str, Any]) -> bool:
    """Whether the run splits reasoning off (its records then get a ``reasoning`` field): the call's
    ``reasoning_markers``, else the generator's (``SimpleGenerator.reasoning_markers``, detected from the model)."""
    if "reasoning_markers" not in generation:
        return getattr(generator, "reasoning_markers", None) is not None
    markers = generation["reasoning_markers"]
    if markers == "auto":
        from .postprocess import detect_reasoning_markers  # here: jobs.py stays torch-free to import

        tokenizer = getattr(generator, "tokenizer", None)
        return tokenizer is not None and detect_reasoning_markers(tokenizer) is not None
    return markers is not None and markers is not False


# ---------------------------------------------------------------------------------------------- dry run
@dataclass
class DryRun:
    """The ``--dry-run`` report: its lines, and whether the store could not be opened."""

    lines: list[str]
    store_error: bool = False


def dry_run(source: Any, report: Any, problems: dict[int, tuple[str, str]], *, model: str | None = None,
            tokenizer: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
            near_dedup: float | None = None, store: str | None = None, output: str | None = None) -> DryRun:
    """What a job would do, without loading a model: counts, duplicates, per-record parameters, prompts that
    cannot be generated from, token lengths (when the tokenizer loads), near-duplicates, the store, the output.
    ``report`` and ``problems`` are :func:`scan_source`'s."""
    lines = [f"input: {getattr(source, 'name', 'input')} ({report.records} records"
             f"{f', {report.chat} chat' if report.chat else ''})",
             f"exact duplicates (same prompt and parameters): {report.duplicates}"]
    if report.with_params:
        lines.append("per-record parameters: " +
                     ", ".join(f"{k} ({v})" for k, v in sorted(report.with_params.items())))
    if problems:
        lines.append(f"prompts that cannot be generated from: {len(problems)}")
        lines.extend(f"  {where}: {problem}" for where, problem in list(problems.values())[:20])
    if model is not None:
        lengths = token_lengths(source, problems, model=model, tokenizer=tokenizer, revision=revision,
                                trust_remote_code=trust_remote_code)
        if lengths is not None:
            lines.append(lengths)
    if near_dedup is not None:
        lines.append(f"near-duplicates at {near_dedup}: {len(near_duplicates(source, near_dedup))}")
    from .store import StoreError

    try:
        opened = open_store(store, create=False)
    except StoreError as err:
        lines.append(f"store: {err}")
        return DryRun(lines, store_error=True)
    if opened is not None:
        with opened:
            lines.append(f"store: {store} holds {opened.count()} finished answer(s) (a rerun reuses those whose "
                         "model, prompt and parameters match)")
    elif store:
        lines.append(f"store: {store} (new)")
    else:
        lines.append("store: none (a rerun starts over)")
    lines.append(f"output: {output or 'stdout'}")
    return DryRun(lines)


def token_lengths(source: Any, problems: dict[int, tuple[str, str]], *, model: str, tokenizer: str | None = None,
                  revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """One line of prompt token counts (before any template), when the tokenizer loads (no model); None when
    the source has no prompt to count."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        options = {k: v for k, v in {"revision": revision, "trust_remote_code": trust_remote_code}.items() if v}
        loaded = AutoTokenizer.from_pretrained(tokenizer or model, **options)
        try:
            from .loading import context_length

            context = context_length(AutoConfig.from_pretrained(model, **options))
        except Exception:  # noqa: BLE001 - the context length is a bonus
            context = None
    except Exception as err:  # noqa: BLE001
        return f"token lengths: not computed (tokenizer not loadable: {str(err).splitlines()[0][:120]})"
    from .pipeline import PROBE_CHARS_PER_TOKEN, probe_too_long

    def encode(texts: list[str]) -> list[list[int]]:
        return loaded(texts, add_special_tokens=True)["input_ids"]

    lengths: list[int] = []
    batch: list[str] = []
    at_least = 0
    for record in source.records():
        if record.index in problems:
            continue
        text = prompt_text(record.prompt)
        if context and len(text) > context * PROBE_CHARS_PER_TOKEN:
            probed = probe_too_long(encode, text, context)
            if probed is not None:  # far too long: counted from a prefix only
                lengths.append(len(probed))
                at_least += 1
                continue
        batch.append(text)
        if len(batch) >= 1000:
            lengths.extend(map(len, encode(batch)))
            batch.clear()
    if batch:
        lengths.extend(map(len, encode(batch)))
    if not lengths:
        return None
    lengths.sort()
    line = (f"prompt tokens (before any template): min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
            f"max {lengths[-1]}{'+' if at_least else ''}, total {sum(lengths)}{'+' if at_least else ''}")
    if context:
        over = sum(1 for n in lengths if n > context)
        line += f"; {over} longer than the model's context of {context}"
        if at_least:
            line += f" ({at_least} far longer, counted only up to {2 * context} tokens)"
    return line
