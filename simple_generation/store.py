"""A durable store of finished answers: one SQLite file (WAL mode), one row per answer.

Every answer is committed as soon as it is finished, so a run killed at any moment (``kill -9``
included) keeps every answer it finished, and a rerun with the same store generates only the rest.
SQLite's write-ahead log makes each commit atomic: the file is never corrupt.

The table, readable with nothing of ours (``sqlite3 run.sqlite``, ``pandas.read_sql``)::

    CREATE TABLE results (
        key               TEXT PRIMARY KEY,  -- sha256 of (model identity, formatted prompt, parameters, copy)
        model             TEXT,              -- the model identity (JSON: path/hub id, revision, LoRA, dtype...)
        prompt            TEXT,              -- the formatted prompt, as fed to the model
        params            TEXT,              -- the generation parameters (canonical JSON)
        texts             TEXT,              -- JSON list of the answers (continuations, stop strings cut)
        token_ids         TEXT,              -- JSON list of lists of generated token ids
        finish_reasons    TEXT,              -- JSON list: "stop" | "length" | "stop_string"
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        error             TEXT,              -- NULL when fine; failed prompts are retried by a rerun
        created_at        REAL,              -- unix time
        logprobs          BLOB               -- NULL unless logprobs/prompt_logprobs were asked (schema 2):
                                             -- zlib-compressed JSON, floats as little-endian float32 (base64)
    );

Schema 2 added ``logprobs``; a schema-1 store is upgraded in place when opened (the column is added, every
answer kept).

Example:
    >>> store = ResultStore("run.sqlite")                       # doctest: +SKIP
    >>> store.get_many(["3f2a..."])                             # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StoreError
from .results import CompletionOutput, RawLogprobs

SCHEMA_VERSION = 2
_UPGRADABLE = {"1"}  # older schema versions this one upgrades in place (ALTER TABLE ADD COLUMN)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    model TEXT,
    prompt TEXT,
    params TEXT,
    texts TEXT,
    token_ids TEXT,
    finish_reasons TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    error TEXT,
    created_at REAL,
    logprobs BLOB
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


def answer_key(model_identity: str, prompt: str, fingerprint: str, copy: int = 0) -> str:
    """The key of one answer: what determines it, hashed. ``copy`` numbers repeated sampled prompts."""
    digest = hashlib.sha256()
    for part in (model_identity, prompt, fingerprint, str(copy)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class StoredAnswer:
    """One row of the store: the ``n`` sequences of one answer as parallel lists (the table's columns); the
    sequences as :class:`~simple_generation.results.CompletionOutput` objects are :attr:`outputs`.

    Example:
        >>> StoredAnswer("3f2a...", [" Four."], [[12, 2]], ["stop"], 5, 2).outputs[0].text
        ' Four.'
    """

    key: str
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # feature: logprobs (engine values: ids and floats; the pipeline decodes the token texts)
    logprobs: list[RawLogprobs] | None = None
    prompt_logprobs: RawLogprobs | None = None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """One :class:`CompletionOutput` per sequence (continuations, as stored: no prompt in front)."""
        return [CompletionOutput(index=i, text=text, token_ids=list(ids), finish_reason=reason)
                for i, (text, ids, reason) in enumerate(zip(self.texts, self.token_ids, self.finish_reasons))]


_COLUMNS_V1 = ("key", "model", "prompt", "params", "texts", "token_ids", "finish_reasons", "prompt_tokens",
               "completion_tokens", "error", "created_at")
_COLUMNS = (*_COLUMNS_V1, "logprobs")
_INSERT = f"INSERT OR REPLACE INTO results ({', '.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"


def _floats(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _unfloats(text: str) -> list[float]:
    data = base64.b64decode(text)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def _encode_raw(raw: RawLogprobs) -> list[Any]:
    flat = [lp for row in raw.top_logprobs for lp in row]
    return [raw.token_ids, _floats(raw.logprobs), raw.top_ids, _floats(flat)]


def _decode_raw(data: list[Any]) -> RawLogprobs:
    token_ids, logprobs, top_ids, flat = data[0], _unfloats(data[1]), data[2], _unfloats(data[3])
    top_logprobs, at = [], 0
    for ids in top_ids:
        top_logprobs.append(flat[at:at + len(ids)])
        at += len(ids)
    return RawLogprobs(token_ids, logprobs, top_ids, top_logprobs)


def encode_logprobs(logprobs: list[RawLogprobs] | None, prompt_logprobs: RawLogprobs | None) -> bytes | None:
    """The ``logprobs`` column of an answer (None when neither was asked): float32, exact for the engines'
    float32 values."""
    if logprobs is None and prompt_logprobs is None:
        return None
    data = {"s": None if logprobs is None else [_encode_raw(raw) for raw in logprobs],
            "p": None if prompt_logprobs is None else _encode_raw(prompt_logprobs)}
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode("ascii"))


def decode_logprobs(blob: bytes | None) -> tuple[list[RawLogprobs] | None, RawLogprobs | None]:
    """(per-sequence logprobs, prompt logprobs) of a ``logprobs`` column."""
    if blob is None:
        return None, None
    data = json.loads(zlib.decompress(blob))
    sequences = None if data.get("s") is None else [_decode_raw(item) for item in data["s"]]
    return sequences, None if data.get("p") is None else _decode_raw(data["p"])


def _refuse(path: str, why: str) -> StoreError:
    return StoreError(f"{path!r} cannot be used as a simple-generation store: {why}. Nothing was written to it; "
                      "pass another path (--store), or move the file away to start over.")


def _check_schema(db: sqlite3.Connection, path: str) -> bool | str:
    """Raise :class:`StoreError` unless the database is empty or one of our stores of this schema (or of an
    older one this version upgrades); True when empty (a new store), the older version (a string) when it must
    be upgraded, else False. Only reads."""
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise _refuse(path, f"not a readable SQLite database ({err})") from err
    if not tables:
        return True
    if "meta" not in tables or "results" not in tables:
        raise _refuse(path, f"a SQLite database of another program (tables: {', '.join(sorted(tables))})")
    try:
        row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        columns = {info[1] for info in db.execute("PRAGMA table_info(results)")}
    except sqlite3.DatabaseError as err:
        raise _refuse(path, f"a damaged database ({err})") from err
    if row is not None and str(row[0]) in _UPGRADABLE and set(_COLUMNS_V1) <= columns:
        return str(row[0])
    if row is None or not set(_COLUMNS) <= columns:
        raise _refuse(path, "its tables are not those of a simple-generation store")
    if str(row[0]) != str(SCHEMA_VERSION):
        newer = str(row[0]).isdigit() and int(row[0]) > SCHEMA_VERSION
        raise _refuse(path, f"it has schema version {row[0]}, this version of simple-generation reads version "
                            f"{SCHEMA_VERSION}" + (" (upgrade simple-generation to use it)" if newer else ""))
    return False


class ResultStore:
    """The SQLite file at ``path`` (created when missing). Safe to share between the processes of one
    machine (``accelerate launch`` ranks write their own answers); not over a network filesystem.

    An existing file is checked before anything is written to it: a file that is not SQLite, a damaged
    one, another program's database or a store of another schema version raises :class:`StoreError`
    and is left as it was. ``check_integrity=True`` also runs SQLite's ``PRAGMA quick_check`` (reads the
    whole file once).
    """

    def __init__(self, path: str | os.PathLike, *, check_integrity: bool = False):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"The store's folder {directory!r} does not exist; create it or pick another "
                                    "path.")
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise _refuse(self.path, "not a regular file")
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            self._open(check_integrity)
        except BaseException:
            self._db.close()
            raise

    def _open(self, check_integrity: bool) -> None:
        # Several processes (accelerate launch ranks) may open a new store at once: switching to WAL and
        # creating the tables take a lock that SQLite may refuse at once rather than wait for; retry.
        deadline = time.monotonic() + 60
        while True:
            try:
                self._db.execute("PRAGMA busy_timeout = 60000")
                new = _check_schema(self._db, self.path)  # reads only: a foreign file is never written to
                if check_integrity and new is not True:
                    problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
                    if problems != ["ok"]:
                        raise _refuse(self.path, f"a damaged database ({'; '.join(problems[:3])})")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                if isinstance(new, str):
                    self._upgrade()
                elif new:
                    # one transaction: another process sees no tables or all of them, never a half-made store
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        if _check_schema(self._db, self.path):
                            for statement in _SCHEMA.split(";"):
                                if statement.strip():
                                    self._db.execute(statement)
                            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                             (str(SCHEMA_VERSION),))
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                    raise _refuse(self.path, str(err)) from err
                time.sleep(0.05)
            except sqlite3.DatabaseError as err:
                raise _refuse(self.path, f"a damaged database ({err})") from err

    def _upgrade(self) -> None:
        """Bring an older store to this schema, in one transaction, keeping every answer."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            old = _check_schema(self._db, self.path)  # another process may have upgraded it meanwhile
            if isinstance(old, str):
                columns = {info[1] for info in self._db.execute("PRAGMA table_info(results)")}
                if "logprobs" not in columns:
                    self._db.execute("ALTER TABLE results ADD COLUMN logprobs BLOB")
                self._db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def get_many(self, keys: Sequence[str]) -> dict[str, StoredAnswer]:
        """The stored answers among ``keys``; failed answers are left out (a rerun retries them)."""
        found: dict[str, StoredAnswer] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT key, texts, token_ids, finish_reasons, prompt_tokens, completion_tokens, logprobs "
                f"FROM results WHERE key IN ({marks}) AND error IS NULL", chunk).fetchall()
            for key, texts, token_ids, reasons, prompt_tokens, completion_tokens, logprobs in rows:
                sequences, prompt = decode_logprobs(logprobs)
                found[key] = StoredAnswer(key, json.loads(texts or "[]"), json.loads(token_ids or "[]"),
                                          json.loads(reasons or "[]"), prompt_tokens or 0, completion_tokens or 0,
                                          logprobs=sequences, prompt_logprobs=prompt)
        return found

    def put(self, answer: StoredAnswer, model: str, prompt: str, params: str) -> None:
        """Commit one answer (replacing an earlier failure under the same key)."""
        self.put_many([(answer, model, prompt, params)])

    def put_many(self, rows: Iterable[tuple[StoredAnswer, str, str, str]]) -> None:
        values = [(a.key, model, prompt, params, json.dumps(a.texts, ensure_ascii=False), json.dumps(a.token_ids),
                   json.dumps(a.finish_reasons), a.prompt_tokens, a.completion_tokens, a.error, time.time(),
                   encode_logprobs(a.logprobs, a.prompt_logprobs))
                  for a, model, prompt, params in rows]
        if not values:
            return
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_INSERT, values)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results WHERE error IS NULL").fetchone()[0])

    def close(self) -> None:
        """Close the file, first folding the write-ahead log into it when no other process uses the store
        (then ``X.sqlite`` alone holds every answer and can be copied; otherwise use ``sqlite3 X ".backup Y"``)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:  # another process holds the store: it checkpoints when it closes
            pass
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
