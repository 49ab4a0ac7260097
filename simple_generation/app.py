"""A local web app (gradio): chat with the loaded model, or run a file of prompts, from the browser.

``simple-generation chat MODEL`` starts it; in Python, ``build_app(gen)`` (or ``gen.chat_app()``) returns the
gradio ``Blocks`` and ``serve(gen)`` launches it on 127.0.0.1.

- **Chat**: multi-turn; each turn's prompt is formatted exactly as ``conversation_from_user_prompts`` formats
  it (named template, else the tokenizer's chat template, else the plain ``User:``/``Assistant:`` transcript),
  tokens stream into the page, Stop ends generation at the next token, template stop strings never show.
- **Batch**: upload a ``.txt``/``.jsonl``/``.csv`` file, run it with a progress bar, preview and download the
  records (the command line's records). Answers go to a SQLite store named after the file's content and the
  parameters, so uploading the same file again (after a reload or a restart) resumes instead of starting over.
- **Images** (an image-text-to-text model, ``gen.vision``): the chat's message box takes images (attach or
  paste); each goes into its user turn as an image part, and earlier turns keep theirs. The batch tab also
  takes a ``.zip`` of one records file and the images it names by relative paths (see :func:`extract_zip`).
- **Translate**: source and target pickers filled from the languages the model translates (any language for an
  LLM), a text box, and a file upload run as ``simple-generation translate`` runs it (resumable the same way).

Only uploaded files are read: no path typed in the page ever reaches the server's disk. Messages are shown as
text (no HTML from a model or a user is rendered), and every response carries a Content-Security-Policy that
lets the page load nothing from outside the app. Uploads are limited in size (``max_upload_mb``); a finished
session's uploads and results files are deleted.

Example:
    >>> from simple_generation import SimpleGenerator
    >>> from simple_generation.app import serve
    >>> serve(SimpleGenerator("/tmp/tiny-llama"))                               # doctest: +SKIP
"""

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .defaults import BATCH_DEFAULTS
from .io.formats import BY_NAME, usual_suffixes

logger = logging.getLogger("simple_generation")

INPUT_SUFFIXES = usual_suffixes(("txt", "jsonl", "csv"))  # (".txt", ".jsonl", ".csv"): what the batch tab takes
ZIP_SUFFIX = ".zip"  # a records file and its images (image-text models)
ZIP_RECORD_SUFFIXES = tuple(s for name in ("jsonl", "json", "csv", "parquet") for s in BY_NAME[name].suffixes)
MAX_ZIP_ENTRIES = 10_000
UNZIPPED_FACTOR = 4  # a zip may unpack to at most 4 x the upload limit (images hardly compress: more is a bomb)
PREVIEW_ROWS = 200
MAX_SESSIONS = 10_000
UPDATE_INTERVAL_S = 0.1
MAX_UPLOAD_MB = 25.0          # a 25 MB file is ~100k prompts; reading it holds nothing, generating it is the work
CACHE_CLEANUP = (3600, 86_400)  # gradio's uploads and results copies older than a day go, checked hourly

# Nothing the page loads may come from outside the app: a model answer (or a message) that slips markup past the
# text rendering still cannot fetch an image, a stylesheet, a frame or send a request to another server.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'self'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)

CSS = """
.gradio-container { max-width: min(1100px, 100vw) !important; margin: 0 auto; }
#about { font-size: 0.92em; opacity: 0.85; }
#chatbot .message-content, #chatbot .message { white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; }
#chat-status, #batch-status { min-height: 1.6em; }
#batch-table { max-width: 100%; overflow-x: auto; }
#chatbot button[aria-label="Share"] { display: none !important; }  /* an image's share button posts to another site */
"""


# ---------------------------------------------------------------------------------------------- chat logic
def default_system_message(gen) -> str | None:
    """What the system box starts with: the generator's system message, else the named template's own.

    None when conversations have no system message at all (no template and no chat template).
    """
    formatter = gen.formatter
    if not formatter.formats_conversations:
        return None
    if formatter.system_message is not None:
        return formatter.system_message
    return formatter.template.system_message if formatter.template is not None else ""


def user_message(text: str, images: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """The chat's user turn: ``{"role": "user", "content": text}``, or with images a list of parts, the images
    first (``{"type": "image", "image": path}``) then the text (left out when empty), as the library takes them.

    Example:
        >>> user_message("Hi")
        {'role': 'user', 'content': 'Hi'}
        >>> user_message("What is this?", ["/tmp/a.png"])["content"]
        [{'type': 'image', 'image': '/tmp/a.png'}, {'type': 'text', 'text': 'What is this?'}]
    """
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, str]] = [{"type": "image", "image": os.fspath(image)} for image in images]
    if text and text.strip():
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _copy_content(content: Any) -> Any:
    return [dict(part) for part in content] if isinstance(content, list) else content


def chat_request(gen, messages: Sequence[dict[str, Any]], system_message: str | None = None) -> list[dict]:
    """What the generator is given for a conversation ending with a user turn: the message list, which the
    formatter renders as ``conversation_from_user_prompts`` does (the named template, else the tokenizer's chat
    template, else the plain transcript followed by ``Assistant:``). Message contents are tokenized as text: a
    ``</s>`` typed in the page is never the control token.

    A system message other than the default goes first as a ``system`` message (it replaces the template's, as
    FastChat does). A turn with images (see :func:`user_message`) keeps its image parts.
    """
    messages = [{"role": m["role"], "content": _copy_content(m["content"])} for m in messages]
    if gen.formatter.formats_conversations:
        if system_message is not None and system_message != default_system_message(gen):
            messages = [{"role": "system", "content": system_message}] + messages
    return messages


def visible_text(raw: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """The part of streamed text that may be shown: cut at the first stop string, and without a tail that
    could still become one (``"USE"`` while ``"USER:"`` is a stop string). Returns (text, stopped)."""
    cut = min((i for i in (raw.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    if cut >= 0:
        return raw[:cut], True
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(raw)), hold, -1):
            if raw.endswith(stop[:size]):
                hold = size
                break
    return raw[: len(raw) - hold], False


def generation_settings(temperature: float, top_p: float, max_new_tokens: int, seed: Any = None) -> dict[str, Any]:
    """Keywords for the generator from the page's controls (temperature 0 = greedy)."""
    settings: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
    if float(temperature) > 0:
        settings["top_p"] = float(top_p)
    if seed not in (None, ""):
        settings["seed"] = int(seed)
    return settings


@dataclass
class ChatUpdate:
    """One step of a streamed reply: the text to show, tokens so far, and at the end how it finished."""

    text: str
    tokens: int
    done: bool = False
    finish: str = ""          # "stop" (end of answer), "length", "stopped" (Stop button), "error"
    error: str | None = None
    seconds: float = 0.0


class _StopOnEvent:
    """A stopping criterion that ends generation once ``event`` is set; counts the tokens generated."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(gen, request: str | list[dict], settings: dict[str, Any], stop_event: threading.Event,
                 lock: Any = None) -> Iterator[ChatUpdate]:
    """Generate the answer to ``request`` in a thread and yield it as it grows; the last update holds the
    answer exactly as ``gen([request], skip_prompt=True, ...)`` returns it, stripped.

    Setting ``stop_event`` ends generation at the next token. Closing the iterator sets it too.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    criterion = _StopOnEvent(stop_event)

    class Stopper(StoppingCriteria):  # transformers wants a StoppingCriteria: one that asks the criterion
        def __call__(self, input_ids, scores, **kwargs):
            return criterion(input_ids, scores, **kwargs)

    stopper = Stopper()
    streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.05)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            with lock if lock is not None else contextlib.nullcontext():
                started = time.perf_counter()
                answers = gen([request], skip_prompt=True, show_progress_bar=False, batch_size=1, streamer=streamer,
                              stopping_criteria=StoppingCriteriaList([stopper]), **settings)
                outcome["seconds"] = time.perf_counter() - started
                outcome["answer"] = answers[0] if isinstance(answers[0], str) else answers[0][0]
                outcome["tokens"] = gen.last_run.generated_tokens
        except Exception as err:  # shown in the page; the app keeps running
            logger.exception("Chat generation failed")
            outcome["error"] = f"{type(err).__name__}: {err}"
        finally:
            streamer.text_queue.put(streamer.stop_signal)

    stop_strings = list(gen.formatter.stop_strings)
    thread = threading.Thread(target=work, name="simple-generation-chat", daemon=True)
    thread.start()
    raw = ""
    try:
        while True:
            try:
                chunk = streamer.text_queue.get(timeout=0.05)
            except queue.Empty:
                if not thread.is_alive():
                    break
                continue
            if chunk is streamer.stop_signal:
                break
            raw += chunk
            shown, _ = visible_text(raw, stop_strings)
            yield ChatUpdate(shown.lstrip(), criterion.steps)
        thread.join()
    finally:
        if thread.is_alive():  # the page went away or the event was cancelled: end generation now
            stop_event.set()
    if "error" in outcome:
        yield ChatUpdate(visible_text(raw, stop_strings)[0].strip(), criterion.steps, done=True, finish="error",
                         error=outcome["error"])
        return
    tokens = outcome.get("tokens", criterion.steps)
    if stop_event.is_set():
        finish = "stopped"
    elif tokens >= settings.get("max_new_tokens", float("inf")):
        finish = "length"
    else:
        finish = "stop"
    yield ChatUpdate(outcome["answer"].strip(), tokens, done=True, finish=finish, seconds=outcome.get("seconds", 0.0))


# --------------------------------------------------------------------------------------------- batch logic
@dataclass
class BatchSettings:
    """The batch tab's parameters; the defaults are the command line's (``defaults.BATCH_DEFAULTS``)."""

    max_new_tokens: int = BATCH_DEFAULTS.max_new_tokens
    temperature: float = BATCH_DEFAULTS.temperature
    top_p: float = BATCH_DEFAULTS.top_p
    seed: int | None = None
    skip_prompt: bool = BATCH_DEFAULTS.skip_prompt
    output_format: str = "jsonl"

    def generation(self) -> dict[str, Any]:
        return generation_settings(self.temperature, self.top_p, self.max_new_tokens, self.seed)

    def key(self) -> str:
        return json.dumps({**self.generation(), "skip_prompt": self.skip_prompt}, sort_keys=True)


@dataclass
class BatchProgress:
    done: int
    total: int
    tokens: int
    seconds: float
    cached: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        parts = [f"{self.done}/{self.total} prompts"]
        if self.tokens or not self.cached:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        if self.cached:
            parts.append(f"{self.cached} from the store")
        return " · ".join(parts)


def default_cache_dir() -> Path:
    """Where the batch tab keeps its stores: ``$SIMPLE_GENERATION_APP_CACHE``, else
    ``~/.cache/simple-generation/app``."""
    env = os.environ.get("SIMPLE_GENERATION_APP_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simple-generation" / "app"


def batch_store_path(data: bytes, suffix: str, settings: BatchSettings, cache_dir: Path) -> Path:
    """One store per (file content, parameters): the same upload after a reload or a restart finds it again."""
    from .jobs import store_path

    return Path(store_path(cache_dir=cache_dir, content=data, key=suffix + settings.key()))


def _read_input(path: Path) -> list[Any]:
    """The records of an uploaded file, read with :mod:`simple_generation.io` (the command line's reader)."""
    from .io import read_records

    return list(read_records(path))


_UNSAFE_NAME = re.compile(r"^(?:[/\\]|[A-Za-z]:)|\\|\x00")  # absolute, a drive, a backslash, a NUL


def _zip_entry_problem(info: Any) -> str | None:
    """Why a zip entry is not extracted (None: it is safe): absolute paths, ``..``, links, encryption."""
    import stat
    from pathlib import PurePosixPath

    name = info.filename
    if _UNSAFE_NAME.search(name) or ".." in PurePosixPath(name).parts:
        return "a path outside the archive's folder (absolute, a drive, a backslash or '..')"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted"
    return None


def extract_zip(archive: str | Path, dest: str | Path, max_bytes: int,
                max_entries: int = MAX_ZIP_ENTRIES) -> Path:
    """Extract an uploaded ``.zip`` of one records file (``.jsonl``/``.json``/``.csv``/``.parquet``, any name,
    in any folder of the archive) and the images it names by relative paths into ``dest``; return the records
    file's path there.

    Refused (``ValueError``, nothing kept): an entry with an absolute path, a drive, a backslash or ``..``, a
    link or an encrypted entry; more than ``max_entries`` entries; more than ``max_bytes`` bytes once unpacked
    (counted as they are written, not trusted from the archive's header: a zip bomb stops there); none or
    several records files. ``__MACOSX/`` entries (Finder's resource forks) are skipped.
    """
    import zipfile

    archive, dest = Path(archive), Path(dest)
    if not zipfile.is_zipfile(archive):
        raise ValueError(f"{archive.name} is not a zip archive.")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    records: list[Path] = []
    written = 0
    with zipfile.ZipFile(archive) as bundle:
        entries = [info for info in bundle.infolist()
                   if not info.is_dir() and not info.filename.startswith("__MACOSX/")]
        if len(entries) > max_entries:
            raise ValueError(f"{archive.name} holds {len(entries)} files; at most {max_entries} are taken.")
        for info in entries:
            problem = _zip_entry_problem(info)
            if problem is not None:
                raise ValueError(f"{archive.name}: entry {info.filename!r} is refused: {problem}.")
        if sum(info.file_size for info in entries) > max_bytes:
            raise ValueError(f"{archive.name} unpacks to more than {max_bytes / 2**20:g} MB.")
        for info in entries:
            target = (root / info.filename).resolve()
            if not target.is_relative_to(root):  # _zip_entry_problem refused these already
                raise ValueError(f"{archive.name}: entry {info.filename!r} is refused: outside the folder.")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with bundle.open(info) as source, open(target, "xb") as sink:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ValueError(f"{archive.name} unpacks to more than {max_bytes / 2**20:g} MB.")
                        sink.write(chunk)
            except FileExistsError:
                raise ValueError(f"{archive.name}: {info.filename!r} is in the archive twice.") from None
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise ValueError(f"{archive.name}: {info.filename!r} cannot be extracted: {err}") from err
            if target.suffix.lower() in ZIP_RECORD_SUFFIXES:
                records.append(target)
    if len(records) != 1:
        found = ", ".join(str(r.relative_to(root)) for r in records) or "none"
        raise ValueError(f"{archive.name} must hold exactly one records file ({', '.join(ZIP_RECORD_SUFFIXES)}) "
                         f"beside its images; found {found}.")
    return records[0]


def _image_paths(record: Any) -> Iterator[str]:
    """The local paths among a record's image sources (its ``image``/``images`` and its messages' parts)."""
    from .images import image_kind, resolve_path
    from .io.records import prompt_images

    for source in [*(getattr(record, "images", None) or []), *prompt_images(record.prompt)]:
        kind = image_kind(source)
        if kind == "path":
            yield resolve_path(source)
        elif kind == "dict" and not source.get("bytes"):
            yield resolve_path(source["path"])


def check_image_paths(records: Sequence[Any], root: str | Path | None, name: str) -> None:
    """Refuse (``ValueError``) records that name an image file outside ``root`` (the folder a zip was extracted
    to; None for a plain upload: no file at all). Only uploaded files are read: a records file cannot make the
    server read ``/etc/...`` or another session's upload. ``data:`` URLs, base64 and bytes need no file."""
    inside = Path(os.path.realpath(root)) if root is not None else None
    for record in records:
        for path in _image_paths(record):
            if inside is None or not Path(os.path.realpath(path)).is_relative_to(inside):
                where = getattr(record, "source", "") or f"record {record.index}"
                hint = ("its images must be files of the same .zip, named by relative paths" if inside is not None
                        else "upload a .zip holding the records file and its images, or give the images as "
                             "data: URLs")
                raise ValueError(f"{where}: image {Path(path).name!r} is not an uploaded file: {hint}.")


def run_batch(gen, upload: str | Path, settings: BatchSettings, cache_dir: str | Path,
              on_progress: Callable[[BatchProgress], None] | None = None,
              lock: Any = None, *, max_unzipped_mb: float = UNZIPPED_FACTOR * MAX_UPLOAD_MB
              ) -> tuple[Path, list[dict[str, Any]]]:
    """Run every record of the uploaded file; return the results file and its records (in input order).

    The results file is written in a new ``simple-generation-app-*`` folder of the temp folder (removed again if
    the run fails; the app removes it once gradio has its copy). A ``.zip`` (one records file and its images,
    :func:`extract_zip`, at most ``max_unzipped_mb`` unpacked) is extracted into that folder and its records
    file is run, so that its relative image paths resolve; the store is named after the zip's content. Image
    paths that lead outside the extracted folder (or any image path in a plain upload) are refused.
    """
    upload = Path(upload)
    suffix = upload.suffix.lower()
    if suffix not in INPUT_SUFFIXES + (ZIP_SUFFIX,):
        raise ValueError(f"Upload a {', '.join(INPUT_SUFFIXES)} file, or a {ZIP_SUFFIX} of a records file and its "
                         f"images (got {upload.name!r}).")
    data = upload.read_bytes()
    out_dir = Path(tempfile.mkdtemp(prefix="simple-generation-app-"))
    try:
        root = None
        source = upload
        if suffix == ZIP_SUFFIX:
            root = out_dir / "input"
            source = extract_zip(upload, root, int(max_unzipped_mb * 1024 * 1024))
        records = _read_input(source)
        if not records:
            raise ValueError(f"{upload.name} holds no prompts.")
        check_image_paths(records, root, upload.name)
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        store = batch_store_path(data, suffix, settings, cache_dir)
        return _run_into(gen, upload, records, settings, store, out_dir, on_progress, lock, root)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


class _KeepingWriter:
    """An ordered writer that also keeps every record (the page previews them). ``hide``: a server folder
    (where a zip was extracted) taken out of error messages, which then name the archive's own paths."""

    def __init__(self, writer: Any, hide: str | None = None):
        self.writer = writer
        self.hide = hide
        self.rows: dict[int, dict[str, Any]] = {}

    def add(self, index: int, record: dict[str, Any], **options: Any) -> None:
        if self.hide and isinstance(record.get("error"), str):
            record = {**record, "error": record["error"].replace(self.hide, "")}
        self.rows[index] = record
        self.writer.add(index, record, **options)


def _run_into(gen, upload: Path, records: list[Any], settings: BatchSettings, store: Path, out_dir: Path,
              on_progress: Callable[[BatchProgress], None] | None, lock: Any,
              root: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The job (:func:`simple_generation.jobs.run_job`) over the records, into ``out_dir``."""
    from .io import OrderedWriter
    from .jobs import JobOptions, JobProgress, ListSource, run_job

    extension = "csv" if settings.output_format == "csv" else "jsonl"
    output = out_dir / f"{upload.stem}.answers.{extension}"

    def progress(p: JobProgress) -> None:
        on_progress(BatchProgress(p.done, p.total or len(records), p.tokens, p.seconds, p.cached))

    options = JobOptions(store=str(store), on_error="record", skip_prompt=settings.skip_prompt,
                         output_format=extension, generation=settings.generation(), show_progress=False,
                         total=len(records), on_progress=progress if on_progress else None)
    with lock if lock is not None else contextlib.nullcontext(), OrderedWriter(output, extension) as writer:
        keeping = _KeepingWriter(writer, os.path.realpath(root) + os.sep if root is not None else None)
        run_job(gen, ListSource(records), keeping, options)
    return output, [keeping.rows[i] for i in sorted(keeping.rows)]


# --------------------------------------------------------------------------------------------- translate logic
# an LLM translates any language: the pickers offer these and take any other name or tag typed in
COMMON_LANGUAGES = ("English", "German", "French", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Russian",
                    "Ukrainian", "Chinese", "Japanese", "Korean", "Arabic", "Hindi", "Turkish")


def translation_choices(gen) -> tuple[list[tuple[str, str]], bool]:
    """The Translate tab's picker entries, ``(label, value)``, and whether a typed-in language is accepted too
    (an LLM: any language)."""
    from .errors import LanguageError
    from .translation import languages_of

    try:
        languages = languages_of(gen)
    except LanguageError:  # an encoder-decoder with no translation recipe: the tab says so when used
        return [], False
    if not languages:
        return [(name, name) for name in COMMON_LANGUAGES], True
    return sorted(((f"{name} ({code})", code) for code, name in languages.items()), key=lambda c: c[0]), False


def translate_text(gen, text: str, target: str, source: str | None, max_new_tokens: int, lock: Any = None):
    """One text translated as ``gen.translate`` does (the Translate tab's box)."""
    with lock if lock is not None else contextlib.nullcontext():
        return gen.translate(text, target=target, source=source or None, max_new_tokens=int(max_new_tokens),
                             show_progress_bar=False)


def run_translation(gen, upload: str | Path, target: str, source: str | None, max_new_tokens: int,
                    cache_dir: str | Path, on_progress: Callable[[BatchProgress], None] | None = None,
                    lock: Any = None) -> tuple[Path, list[dict[str, Any]]]:
    """Translate every record of an uploaded file with the job layer (as ``simple-generation translate``); a
    record's own ``source``/``target`` fields win. Returns the results file (JSONL) and its records."""
    from .io import OrderedWriter
    from .jobs import JobOptions, JobProgress, ListSource, run_job, store_path
    from .translation import TranslationJob, TranslationSource, Translator

    upload = Path(upload)
    if upload.suffix.lower() not in INPUT_SUFFIXES:
        raise ValueError(f"Upload a {', '.join(INPUT_SUFFIXES)} file (got {upload.name!r}).")
    data = upload.read_bytes()
    records = _read_input(upload)
    if not records:
        raise ValueError(f"{upload.name} holds no texts.")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    key = json.dumps({"translate": [target, source or None, int(max_new_tokens)]})
    store = store_path(cache_dir=cache_dir, content=data, key=upload.suffix.lower() + key)
    out_dir = Path(tempfile.mkdtemp(prefix="simple-generation-app-"))
    output = out_dir / f"{upload.stem}.translations.jsonl"

    def progress(p: JobProgress) -> None:
        on_progress(BatchProgress(p.done, p.total or len(records), p.tokens, p.seconds, p.cached))

    try:
        translator = Translator(gen)
        options = JobOptions(store=store, on_error="record", generation={"max_new_tokens": int(max_new_tokens)},
                             show_progress=False, total=len(records), on_progress=progress if on_progress else None)
        with lock if lock is not None else contextlib.nullcontext(), OrderedWriter(output, "jsonl") as writer:
            keeping = _KeepingWriter(writer)
            run_job(TranslationJob(translator), TranslationSource(ListSource(records), translator, target,
                                                                  source or None), keeping, options)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return output, [keeping.rows[i] for i in sorted(keeping.rows)]


# -------------------------------------------------------------------------------------------------- about
def _template_name(gen) -> str:
    formatter = gen.formatter
    if formatter.template is not None:
        return formatter.template.name
    if getattr(gen.tokenizer, "chat_template", None):
        return "tokenizer chat template"
    return "none (plain User:/Assistant: transcript)"


def engine_description(gen) -> str:
    """The engine that ran the last call (the one chosen at load before any), and why when it fell back.

    Chat turns stream and can be stopped, which the continuous engine cannot do: they run on the static engine,
    and the line says so.
    """
    run = getattr(gen, "last_run", None)
    name = getattr(run, "engine", "") or ""
    reason = getattr(run, "engine_reason", "") or ""
    if not name:
        engine = getattr(gen, "engine", None)
        name = (getattr(engine, "name", None) or type(engine).__name__) if engine is not None else "hf"
        reason = getattr(gen, "engine_reason", "") or ""
    if "fell back" not in reason:
        return name
    return f"{name} (fell back: {reason.rsplit('; fell back', 1)[0]})"


class _Emissions:
    """Energy and emissions of every call made by the app since it started (when the generator tracks them)."""

    def __init__(self):
        self.kwh = 0.0
        self.kg = 0.0
        self.measured = False
        self._lock = threading.Lock()

    def add(self, run: Any) -> None:
        kg = getattr(run, "emissions_kg_co2eq", None)
        kwh = getattr(run, "energy_kwh", None)
        with self._lock:
            if kg is not None:
                self.kg += kg
                self.measured = True
            if kwh is not None:
                self.kwh += kwh

    def describe(self, gen) -> str:
        if not self.measured:
            return "not tracked" if not getattr(gen, "track_emissions", False) else "none yet"
        return f"{self.kg * 1000:.4f} g CO₂eq ({self.kwh * 1000:.4f} Wh)"


def about_line(gen, emissions: _Emissions) -> str:
    dtype = str(getattr(gen.model, "dtype", "")).replace("torch.", "")
    return (f"**Model** `{gen.model_name_or_path}` · **dtype** {dtype} · **device** {gen.placement} · "
            f"**engine** {engine_description(gen)} · **template** {_template_name(gen)} · "
            f"**emissions since start** {emissions.describe(gen)}")


# ------------------------------------------------------------------------------------------------------ UI
def build_app(gen, *, cache_dir: str | Path | None = None, title: str = "simple-generation",
              max_upload_mb: float = MAX_UPLOAD_MB):
    """The gradio ``Blocks`` of the app for generator ``gen`` (``.launch()`` it, or use :func:`serve`).

    ``cache_dir`` holds the batch tab's stores (default: :func:`default_cache_dir`). Its ``launch()`` adds the
    app's Content-Security-Policy, refuses uploads over ``max_upload_mb`` megabytes and uses the app's CSS (other
    launch arguments are gradio's). A session's uploads and results files are deleted when its page closes,
    any left over after a day, and all of them when the server stops.
    """
    try:
        import gradio as gr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('The web app needs gradio: pip install -e ".[app]" in a clone of simple-generation') from err

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lock = threading.Lock()  # one generation at a time on the model (chat turns and batch jobs)
    emissions = _Emissions()
    # Each page's Stop event, by gradio session. Not dropped on gradio's unload (a heartbeat that drops under load
    # fires it while the page is still there): the least recently used are dropped past MAX_SESSIONS.
    stop_events: dict[str, threading.Event] = {}
    sessions_lock = threading.Lock()
    system_default = default_system_message(gen)
    context = getattr(gen, "context_length", None) or 4096
    defaults = gen.defaults
    max_tokens_limit = max(16, min(int(context), 8192))
    default_max_new = max(1, min(int(defaults.max_new_tokens or 256), max_tokens_limit))
    default_temperature = float(defaults.temperature) if defaults.do_sample else 0.0
    vision = getattr(gen, "vision", None) is not None  # an image-text model: images in the chat and the batch zip
    batch_suffixes = list(INPUT_SUFFIXES) + ([ZIP_SUFFIX] if vision else [])

    def session_event(request: gr.Request | None) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        with sessions_lock:
            event = stop_events.pop(key, None) or threading.Event()
            stop_events[key] = event  # most recently used last
            while len(stop_events) > MAX_SESSIONS:
                oldest = next(iter(stop_events))
                if oldest == key:
                    break
                del stop_events[oldest]
        return event

    # Files of each session (uploads, gradio's copies of results) and results folders of runs in progress.
    session_files: dict[str, set[str]] = {}
    run_dirs: dict[str, set[Path]] = {}

    def session_key(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "default"

    def remember_upload(upload, request: gr.Request):
        if upload:
            with sessions_lock:
                session_files.setdefault(session_key(request), set()).add(str(upload))

    def after_batch(download, request: gr.Request):
        """gradio has its copy of the results file: drop the run's folder, remember the copy for the session."""
        key = session_key(request)
        with sessions_lock:
            folders = run_dirs.pop(key, set())
            if download:
                session_files.setdefault(key, set()).add(str(download))
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def end_session(request: gr.Request):
        key = session_key(request)
        with sessions_lock:
            files = session_files.pop(key, set())
            folders = run_dirs.pop(key, set())
        for name in files:
            _remove_upload(name)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def about() -> str:
        return about_line(gen, emissions)

    def status_line(update: ChatUpdate) -> str:
        if not update.done:
            return f"Generating… {update.tokens} tokens"
        if update.error:
            return f"**Error:** {update.error}"
        rate = f" · {update.tokens / update.seconds:.1f} tokens/s" if update.seconds > 0 else ""
        label = {"stop": "end of answer", "length": "max new tokens reached", "stopped": "stopped"}[update.finish]
        return f"{update.tokens} tokens{rate} · {label}"

    def attached_images(files: Sequence[Any], request: gr.Request) -> list[str]:
        """The images attached to a message: uploads only (never a path sent by the page), each decodable; kept
        until the session ends (earlier turns still need theirs)."""
        from .errors import ImageError
        from .images import load_image

        paths = []
        for name in files or []:
            path = Path(name if isinstance(name, str) else getattr(name, "path", None) or str(name))
            if not _is_upload(path):
                raise gr.Error("Only images uploaded through the page are read.")
            with sessions_lock:
                session_files.setdefault(session_key(request), set()).add(str(path))
            try:
                load_image(str(path))
            except ImageError as err:
                raise gr.Error(f"{path.name} is not an image this app can read: {err}") from err
            paths.append(str(path))
        return paths

    def add_user_message(value: Any, messages: list, request: gr.Request):
        session_event(request).clear()
        messages = list(messages or [])
        if vision:  # the multimodal box: {"text": ..., "files": [paths]}
            value = value or {}
            text, images = value.get("text") or "", attached_images(value.get("files") or [], request)
        else:
            text, images = value, []
        if images or (text and text.strip()):
            messages.append(user_message(text, images))
        cleared = {"text": "", "files": []} if vision else ""
        return cleared, messages, _display(messages), gr.update(interactive=True)

    def respond(messages: list, system: str | None, temperature: float, top_p: float, max_new_tokens: float,
                request: gr.Request):
        messages = list(messages or [])
        if not messages or messages[-1]["role"] != "user":
            yield messages, _display(messages), gr.update(), about()
            return
        event = session_event(request)
        request_ = chat_request(gen, messages, system if system_default is not None else None)
        settings = generation_settings(temperature, top_p, max_new_tokens)
        shown_at = 0.0
        for update in stream_reply(gen, request_, settings, event, lock):
            if not update.done and time.monotonic() - shown_at < UPDATE_INTERVAL_S:
                continue  # the page re-renders the whole chat on each update: at most ~10 a second
            shown_at = time.monotonic()
            if update.done:
                if update.error is None or update.text:
                    messages = messages + [{"role": "assistant", "content": update.text}]
                if update.error is None:
                    emissions.add(gen.last_run)
                yield messages, _display(messages), status_line(update), about()
            else:
                yield messages, _display(messages, update.text), status_line(update), about()

    def stop(request: gr.Request):
        session_event(request).set()

    def clear(request: gr.Request):
        session_event(request).set()
        return [], [], ""

    def batch(upload, max_new_tokens, temperature, top_p, seed, skip_prompt, output_format, request: gr.Request,
              progress=gr.Progress()):  # noqa: B008 - gradio's idiom
        if upload is None:
            raise gr.Error(f"Upload a .txt, .jsonl or .csv file{' (or a .zip with images)' if vision else ''} first.")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
        if not _is_upload(path):  # gradio refuses other paths already; never read a path sent by the page
            raise gr.Error("Only files uploaded through the page are read.")
        seed = str(seed or "").strip()
        if seed and not seed.lstrip("-").isdigit():
            raise gr.Error(f"The seed must be an integer, got {seed!r}.")
        settings = BatchSettings(int(max_new_tokens), float(temperature), float(top_p),
                                 int(seed) if seed else None, bool(skip_prompt), output_format)
        last = {}

        def on_progress(p: BatchProgress) -> None:
            last["p"] = p
            progress((p.done, p.total), desc=p.describe(), unit="prompts")

        try:
            if path.suffix.lower() == ZIP_SUFFIX and not vision:
                raise ValueError("A .zip (a records file with its images) needs an image-text model.")
            output, rows = run_batch(gen, path, settings, cache_dir, on_progress, lock,
                                     max_unzipped_mb=UNZIPPED_FACTOR * max_upload_mb)
        except Exception as err:
            logger.exception("Batch run failed")
            raise gr.Error(f"{type(err).__name__}: {err}") from err
        with sessions_lock:
            run_dirs.setdefault(session_key(request), set()).add(output.parent)
        emissions.add(gen.last_run)
        p = last.get("p")
        failed = sum(1 for r in rows if r.get("error"))
        summary = f"Done: {p.describe() if p else ''}" + (f" · **{failed} failed**" if failed else "")
        return summary, _preview(rows), str(output), about()

    language_choices, any_language = translation_choices(gen)

    def translate_box(text, source, target, max_new_tokens):
        if not text or not text.strip():
            raise gr.Error("Type or paste a text to translate.")
        if not target:
            raise gr.Error("Pick a target language.")
        try:
            translation = translate_text(gen, text, target, source, max_new_tokens, lock)
        except ValueError as err:  # an unknown language names the close ones
            raise gr.Error(str(err)) from err
        emissions.add(gen.last_run)
        if translation.error is not None:
            raise gr.Error(translation.error)
        info = (f"{translation.source or 'source not given'} → {translation.target} · {translation.pieces} "
                f"piece(s){' · a piece reached max new tokens' if translation.finish_reason == 'length' else ''}")
        return translation.text, info, about()

    def translate_file(upload, source, target, max_new_tokens, request: gr.Request,
                       progress=gr.Progress()):  # noqa: B008 - gradio's idiom
        if upload is None:
            raise gr.Error("Upload a .txt, .jsonl or .csv file first.")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
        if not _is_upload(path):
            raise gr.Error("Only files uploaded through the page are read.")
        last = {}

        def on_progress(p: BatchProgress) -> None:
            last["p"] = p
            progress((p.done, p.total), desc=p.describe(), unit="texts")

        try:
            output, rows = run_translation(gen, path, target, source, max_new_tokens, cache_dir, on_progress, lock)
        except Exception as err:
            logger.exception("Translation run failed")
            raise gr.Error(f"{type(err).__name__}: {err}") from err
        with sessions_lock:
            run_dirs.setdefault(session_key(request), set()).add(output.parent)
        failed = sum(1 for r in rows if r.get("error"))
        p = last.get("p")
        summary = f"Done: {p.describe() if p else ''}" + (f" · **{failed} failed**" if failed else "")
        return summary, _preview(rows), str(output), about()

    class AppBlocks(gr.Blocks):
        def launch(self, *args, **kwargs):
            """gradio's ``launch``, with the app's security headers, upload limit and CSS."""
            return super().launch(*args, **launch_options(kwargs, max_upload_mb))

    with AppBlocks(title=title, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"## {title}")
        about_md = gr.Markdown(about(), elem_id="about")
        with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
            messages_state = gr.State([])
            chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=440, render_markdown=False,
                                 feedback_options=None, buttons=["copy"], group_consecutive_messages=False)
            with gr.Row(equal_height=True):
                if vision:  # text and images (attach with the clip, paste or drop); the Send button submits too
                    textbox = gr.MultimodalTextbox(
                        placeholder="Type a message, attach or paste images, Enter to send", show_label=False,
                        scale=5, min_width=200, elem_id="chat-input", autofocus=True, file_types=["image"],
                        file_count="multiple", sources=["upload"], submit_btn=False)
                else:
                    textbox = gr.Textbox(placeholder="Type a message, Enter to send", show_label=False, scale=5,
                                         min_width=200, elem_id="chat-input", autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
                stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="chat-stop",
                                        interactive=False)
                clear_button = gr.Button("Clear", scale=1, min_width=80, elem_id="chat-clear")
            chat_status = gr.Markdown("", elem_id="chat-status")
            with gr.Accordion("Generation settings", open=True):
                system_box = gr.Textbox(
                    value=system_default or "", label="System message", lines=4, max_lines=10, elem_id="system",
                    interactive=system_default is not None,
                    info=None if system_default is not None else
                    "This model has no chat template: the prompt is the plain User:/Assistant: transcript.",
                )
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=default_temperature, step=0.05,
                                            label="Temperature (0 = greedy)", elem_id="chat-temperature",
                                            min_width=220)
                    top_p = gr.Slider(0.05, 1, value=float(defaults.top_p or 1.0), step=0.05, label="top_p",
                                      elem_id="chat-top-p", min_width=220)
                    max_new = gr.Slider(1, max_tokens_limit, value=default_max_new, step=1, label="Max new tokens",
                                        elem_id="chat-max-new-tokens", min_width=220)
        with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
            gr.Markdown("Upload a `.txt` (one prompt per line), `.jsonl` or `.csv` file (a `prompt` or `text` field; "
                        "other fields are carried into the results). Running the same file with the same settings "
                        "again resumes from its store." + (
                            " With images: a `.zip` of one records file (`.jsonl`, `.csv` or `.parquet`, any name) "
                            "and the images its `image`/`images` fields name by relative paths "
                            "(`images/a.png`); `data:` URLs need no zip." if vision else ""))
            upload = gr.File(label="Prompts file", file_types=batch_suffixes, type="filepath",
                             elem_id="batch-file", height=120)
            with gr.Row():
                b_max_new = gr.Slider(1, max_tokens_limit, value=min(BATCH_DEFAULTS.max_new_tokens, max_tokens_limit),
                                      step=1, label="Max new tokens", elem_id="batch-max-new-tokens", min_width=220)
                b_temperature = gr.Slider(0, 2, value=BATCH_DEFAULTS.temperature, step=0.05,
                                          label="Temperature (0 = greedy)", elem_id="batch-temperature", min_width=220)
                b_top_p = gr.Slider(0.05, 1, value=BATCH_DEFAULTS.top_p, step=0.05, label="top_p",
                                    elem_id="batch-top-p", min_width=220)
            with gr.Row(equal_height=True):
                b_seed = gr.Textbox(value="", label="Seed", placeholder="none (an integer for reproducible sampling)",
                                    elem_id="batch-seed", min_width=220)
                b_skip = gr.Checkbox(value=BATCH_DEFAULTS.skip_prompt, label="Answer only (skip the prompt)",
                                     elem_id="batch-skip", min_width=220)
                b_format = gr.Radio(["jsonl", "csv"], value="jsonl", label="Results format",
                                    elem_id="batch-format", min_width=220)
            run_button = gr.Button("Run", variant="primary", elem_id="batch-run")
            batch_status = gr.Markdown("", elem_id="batch-status")
            table = gr.Dataframe(label="Results (preview)", elem_id="batch-table", interactive=False, wrap=True,
                                 max_height=420, visible=False)  # shown with the first results, never empty
            download = gr.File(label="Results file", elem_id="batch-download", interactive=False, type="filepath")

        with gr.Tab("Translate", id="translate", elem_id="tab-translate"):
            with gr.Row():
                t_source = gr.Dropdown(language_choices, value=None, label="Source (empty: the model's default)",
                                       allow_custom_value=any_language, elem_id="translate-source", min_width=220)
                t_target = gr.Dropdown(language_choices, value=None, label="Target", elem_id="translate-target",
                                       allow_custom_value=any_language, min_width=220)
                t_max_new = gr.Slider(1, max_tokens_limit, value=min(BATCH_DEFAULTS.max_new_tokens, max_tokens_limit),
                                      step=1, label="Max new tokens per sentence", elem_id="translate-max-new-tokens",
                                      min_width=220)
            with gr.Row(equal_height=True):
                t_text = gr.Textbox(label="Text", lines=8, elem_id="translate-text")
                t_out = gr.Textbox(label="Translation", lines=8, interactive=False, elem_id="translate-output")
            t_button = gr.Button("Translate", variant="primary", elem_id="translate-run")
            t_status = gr.Markdown("", elem_id="translate-status")
            gr.Markdown("Or upload a `.txt`, `.jsonl` or `.csv` file (a `text` or `prompt` field; a record's own "
                        "`source`/`target` fields win). The same file with the same settings resumes.")
            t_upload = gr.File(label="Texts file", file_types=list(INPUT_SUFFIXES), type="filepath",
                               elem_id="translate-file", height=120)
            t_file_button = gr.Button("Translate file", elem_id="translate-file-run")
            t_file_status = gr.Markdown("", elem_id="translate-file-status")
            t_table = gr.Dataframe(label="Results (preview)", elem_id="translate-table", interactive=False, wrap=True,
                                   max_height=420, visible=False)
            t_download = gr.File(label="Results file", elem_id="translate-download", interactive=False,
                                 type="filepath")

        submit_inputs = [textbox, messages_state]
        submit_outputs = [textbox, messages_state, chatbot, stop_button]
        respond_inputs = [messages_state, system_box, temperature, top_p, max_new]
        respond_outputs = [messages_state, chatbot, chat_status, about_md]
        for trigger in (textbox.submit, send.click):
            trigger(add_user_message, submit_inputs, submit_outputs, queue=False).then(
                respond, respond_inputs, respond_outputs, concurrency_id="model", concurrency_limit=1,
                show_progress="hidden",
            ).then(lambda: gr.update(interactive=False), None, stop_button, queue=False, show_progress="hidden")
        stop_button.click(stop, None, None, queue=False)
        clear_button.click(clear, None, [messages_state, chatbot, chat_status], queue=False)
        chatbot.clear(clear, None, [messages_state, chatbot, chat_status], queue=False)
        run_button.click(batch, [upload, b_max_new, b_temperature, b_top_p, b_seed, b_skip, b_format],
                         [batch_status, table, download, about_md], concurrency_id="model", concurrency_limit=1
                         ).then(after_batch, download, None, queue=False, show_progress="hidden")
        upload.upload(remember_upload, upload, None, queue=False, show_progress="hidden")
        t_button.click(translate_box, [t_text, t_source, t_target, t_max_new], [t_out, t_status, about_md],
                       concurrency_id="model", concurrency_limit=1)
        t_file_button.click(translate_file, [t_upload, t_source, t_target, t_max_new],
                            [t_file_status, t_table, t_download, about_md], concurrency_id="model",
                            concurrency_limit=1).then(after_batch, t_download, None, queue=False,
                                                      show_progress="hidden")
        t_upload.upload(remember_upload, t_upload, None, queue=False, show_progress="hidden")
        demo.unload(end_session)
    demo.queue(default_concurrency_limit=1)
    return demo


def _is_upload(path: Path) -> bool:
    """Whether ``path`` is a file gradio received as an upload (inside its upload folder)."""
    from gradio.utils import get_upload_folder

    try:
        return path.resolve().is_relative_to(Path(get_upload_folder()).resolve())
    except (OSError, ValueError):
        return False


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def as_text(content: str) -> str:
    """``content`` for the chat display, shown as the text it is: every ``<`` that could open a tag or a comment
    becomes ``&lt;``, so no markup from a model or a user is ever rendered (no image, link, frame or style)."""
    return _TAG_START.sub("&lt;", content)


def _shown(content: Any) -> Any:
    """A message's content for the chatbot: text through :func:`as_text`; an image part as gradio's own file
    display of the upload (served by the app itself, so the page's policy allows it)."""
    if isinstance(content, str):
        return as_text(content)
    shown: list[Any] = []
    for part in content:
        if part.get("type") == "image":
            shown.append({"path": str(part["image"]), "alt_text": "image"})
        elif part.get("type") == "text":
            shown.append(as_text(part.get("text") or ""))
    return shown


def _display(messages: list[dict[str, Any]], partial: str | None = None) -> list[dict[str, Any]]:
    shown = [{"role": m["role"], "content": _shown(m["content"])} for m in messages]
    if partial is not None:
        shown.append({"role": "assistant", "content": as_text(partial)})
    return shown


def _preview(rows: list[dict[str, Any]]):
    import gradio as gr
    import pandas as pd

    head = rows[:PREVIEW_ROWS]
    frame = pd.DataFrame([{k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v)
                           for k, v in row.items()} for row in head])
    text_widths = {"prompt": 220, "answer": 240, "error": 120}
    widths = [f"{text_widths.get(name) or max(70, 9 * len(str(name)) + 28)}px" for name in frame.columns]
    return gr.Dataframe(value=frame, column_widths=widths, visible=True)


def serve(gen, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          max_upload_mb: float = MAX_UPLOAD_MB, **launch_kwargs: Any):
    """Build the app and launch it: on 127.0.0.1 unless ``host`` says otherwise; ``share=True`` is a public link.

    Uploads over ``max_upload_mb`` megabytes are refused. Blocks until interrupted, unless
    ``prevent_thread_lock=True`` is passed (then the ``Blocks`` is returned).
    """
    cache_dir = launch_kwargs.pop("cache_dir", None)
    demo = build_app(gen, cache_dir=cache_dir, max_upload_mb=max_upload_mb)
    demo.launch(server_name=host, server_port=port, share=share, **launch_kwargs)
    return demo


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` (the Content-Security-Policy...) to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [h for h in SECURITY_HEADERS if h[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def launch_options(kwargs: dict[str, Any], max_upload_mb: float = MAX_UPLOAD_MB) -> dict[str, Any]:
    """gradio ``launch`` keywords with the app's own added: :class:`SecurityHeaders`, the upload limit, the CSS."""
    from starlette.middleware import Middleware

    if not max_upload_mb or max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be a positive number of megabytes, got {max_upload_mb!r}.")
    options = dict(kwargs)
    options.setdefault("css", CSS)
    options.setdefault("max_file_size", int(max_upload_mb * 1024 * 1024))
    app_kwargs = dict(options.get("app_kwargs") or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(SecurityHeaders)]
    options["app_kwargs"] = app_kwargs
    return options


def _remove_upload(name: str) -> None:
    """Delete a file gradio keeps (an upload, a results copy) and its folder when that is left empty."""
    path = Path(name)
    if not _is_upload(path):
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
