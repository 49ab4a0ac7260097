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
        created_at        REAL               -- unix time
    );

Example:
    >>> store = ResultStore("run.sqlite")                       # doctest: +SKIP
    >>> store.get_many(["3f2a..."])                             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SCHEMA_VERSION = 1

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
    created_at REAL
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
    """One row of the store."""

    key: str
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class ResultStore:
    """The SQLite file at ``path`` (created when missing). Safe to share between the processes of one
    machine (``accelerate launch`` ranks write their own answers); not over a network filesystem."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"The store's folder {directory!r} does not exist; create it or pick another "
                                    "path.")
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        # Several processes (accelerate launch ranks) may open a new store at once: switching to WAL and
        # creating the tables take a lock that SQLite may refuse at once rather than wait for; retry.
        deadline = time.monotonic() + 60
        while True:
            try:
                self._db.execute("PRAGMA busy_timeout = 60000")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                    self._db.close()
                    raise ValueError(f"{self.path!r} is not a usable simple-generation store ({err}). Pass another "
                                     "path, or delete the file to start over.") from err
                time.sleep(0.05)
            except sqlite3.DatabaseError as err:
                self._db.close()
                raise ValueError(f"{self.path!r} is not a usable simple-generation store ({err}). Pass another "
                                 "path, or delete the file to start over.") from err

    def get_many(self, keys: Sequence[str], include_errors: bool = False) -> dict[str, StoredAnswer]:
        """The stored answers among ``keys`` (failed ones only with ``include_errors``)."""
        found: dict[str, StoredAnswer] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT key, texts, token_ids, finish_reasons, prompt_tokens, completion_tokens, error "
                f"FROM results WHERE key IN ({marks})", chunk).fetchall()
            for key, texts, token_ids, reasons, prompt_tokens, completion_tokens, error in rows:
                if error is not None and not include_errors:
                    continue
                found[key] = StoredAnswer(key, json.loads(texts or "[]"), json.loads(token_ids or "[]"),
                                          json.loads(reasons or "[]"), prompt_tokens or 0, completion_tokens or 0,
                                          error)
        return found

    def put(self, answer: StoredAnswer, model: str, prompt: str, params: str) -> None:
        """Commit one answer (replacing an earlier failure under the same key)."""
        self.put_many([(answer, model, prompt, params)])

    def put_many(self, rows: Iterable[tuple[StoredAnswer, str, str, str]]) -> None:
        values = [(a.key, model, prompt, params, json.dumps(a.texts, ensure_ascii=False), json.dumps(a.token_ids),
                   json.dumps(a.finish_reasons), a.prompt_tokens, a.completion_tokens, a.error, time.time())
                  for a, model, prompt, params in rows]
        if not values:
            return
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results WHERE error IS NULL").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
