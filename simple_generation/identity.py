"""What a model is, for store keys and Ray job files: the CONTENT of every file that changes the answers.

A local folder is signed by the sha256 of each file that changes token ids, formatting or weights
(weights, config, generation config, tokenizer files, chat templates, remote code): a checkpoint
replaced by another of the same size written in the same second (``cp -p``, ``rsync -a``, two
``save_pretrained`` calls) is a new model. The same holds for a separate tokenizer folder and a LoRA
adapter folder. A hub id is signed by its resolved commit, which already names its content.

Hashing a big checkpoint takes a while (about 1.4 s per GB on one core), so each file's hash is cached
in ``$SIMPLE_GENERATION_CACHE/file-hashes.sqlite`` (default ``~/.cache/simple_generation``, or under
``$XDG_CACHE_HOME``), keyed by the file's real path and its stat stamp (size, mtime_ns, ctime_ns,
inode, device): a checkpoint is hashed once, later loads only ``stat`` its files. When the cache
cannot be used (unwritable folder, locked or corrupt file), files are hashed without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

logger = logging.getLogger("simple_generation")

# Files that change the answers: weights, configs (config.json, generation_config.json, tokenizer_config.json,
# special_tokens_map.json, chat_template.json, adapter_config.json, *.index.json), tokenizer files (tokenizer.json,
# vocab/merges, sentencepiece *.model, *.tiktoken), chat_template.jinja, and a checkpoint's remote code (*.py).
_SIGNED = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5|json|jinja|model|tiktoken|txt|py)$",
                     re.IGNORECASE)
_SIGNED_SUBFOLDERS = ("additional_chat_templates",)  # transformers keeps extra chat templates there
_HASHED: dict[tuple[str, str], str] = {}  # this process's hashes, by (real path, stamp)


def cache_path() -> Path:
    """Where file hashes are cached (shared with the OpenVINO export cache's root)."""
    root = os.environ.get("SIMPLE_GENERATION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "simple_generation")
    return Path(root) / "file-hashes.sqlite"


def _stamp(stat: os.stat_result) -> str:
    # ctime cannot be set by a user (``cp -p``/``touch -r`` set mtime, which moves ctime to now): a file
    # rewritten in place keeps its path, inode and (if copied with -p) mtime, never its ctime.
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}:{stat.st_dev}"


class _HashCache:
    """The on-disk cache: one SQLite table, opened per identity; every failure means "no cache"."""

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit, waits for writers
            self.db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, stamp TEXT NOT NULL, "
                            "sha256 TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as err:
            self._give_up(err)

    def _give_up(self, err: Exception) -> None:
        logger.debug("File hash cache %s not used (%s): hashing without it.", cache_path(), err)
        if self.db is not None:
            self.db.close()
        self.db = None

    def get(self, path: str, stamp: str) -> str | None:
        if self.db is None:
            return None
        try:
            row = self.db.execute("SELECT sha256 FROM hashes WHERE path = ? AND stamp = ?", (path, stamp)).fetchone()
        except sqlite3.Error as err:
            self._give_up(err)
            return None
        return row[0] if row else None

    def put(self, path: str, stamp: str, digest: str) -> None:
        if self.db is None:
            return
        try:
            self.db.execute("INSERT OR REPLACE INTO hashes (path, stamp, sha256) VALUES (?, ?, ?)",
                            (path, stamp, digest))
        except sqlite3.Error as err:
            self._give_up(err)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def file_sha256(path: str | os.PathLike, cache: _HashCache | None = None) -> str:
    """The sha256 (hex) of a file's content, from the cache when the file's stat stamp is unchanged."""
    real = os.path.realpath(path)  # hub snapshots are symlinks into blobs: cache the blob once
    before = _stamp(os.stat(real))
    digest = _HASHED.get((real, before))
    own = cache is None
    cache = _HashCache() if own and digest is None else cache
    try:
        if digest is None and cache is not None:
            digest = cache.get(real, before)
        if digest is None:
            with open(real, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if _stamp(os.stat(real)) != before:  # written to while we read it: use the hash, never cache it
                return digest
            if cache is not None:
                cache.put(real, before, digest)
        _HASHED[(real, before)] = digest
        return digest
    finally:
        if own and cache is not None:
            cache.close()


def _signed_files(folder: str, gguf_file: str | None) -> list[str]:
    """Names (relative to ``folder``) of the files that are signed, sorted; hidden files are skipped."""
    names = []
    for sub in ("", *_SIGNED_SUBFOLDERS):
        where = os.path.join(folder, sub)
        if not os.path.isdir(where):
            continue
        for name in os.listdir(where):
            relative = os.path.join(sub, name) if sub else name
            if name.startswith(".") or not _SIGNED.search(name) or not os.path.isfile(os.path.join(where, name)):
                continue
            # With gguf_file only that .gguf is loaded: don't hash the folder's other quantizations.
            if gguf_file and name.lower().endswith(".gguf") and relative != gguf_file:
                continue
            names.append(relative)
    return sorted(names)


def signature(path: str | os.PathLike | None, *, gguf_file: str | None = None,
              cache: _HashCache | None = None) -> list[list[str]] | None:
    """``[[name, sha256], ...]`` of a local folder's signed files (or of a single file); None for a hub id."""
    if not path:
        return None
    path = os.fspath(path)
    if os.path.isfile(path):
        return [[os.path.basename(path), file_sha256(path, cache)]]
    if not os.path.isdir(path):
        return None
    own = cache is None
    cache = _HashCache() if own else cache
    try:
        return [[name, file_sha256(os.path.join(path, name), cache)] for name in _signed_files(path, gguf_file)]
    finally:
        if own:
            cache.close()


def _where(path: str | None) -> str | None:
    """A local path as an absolute path, a hub id as it is."""
    if path and os.path.exists(path):
        return os.path.abspath(path)
    return path


def sources(model: str, *, tokenizer: str | None = None, lora: str | None = None, revision: str | None = None,
            gguf_file: str | None = None, commit: str | None = None) -> dict[str, Any]:
    """The file side of a model's identity: where each part comes from and what its files hold.

    ``commit`` is a hub model's resolved commit (a local folder has none: its content is signed instead).
    """
    cache = _HashCache()
    try:
        return {
            "model": _where(model), "revision": commit or revision,
            "files": signature(model, gguf_file=gguf_file, cache=cache), "gguf_file": gguf_file,
            "tokenizer": _where(tokenizer), "tokenizer_files": signature(tokenizer, cache=cache),
            "lora": _where(lora), "lora_files": signature(lora, cache=cache),
        }
    finally:
        cache.close()


def model_identity(model_name_or_path, tokenizer_name_or_path, config, lora_weights, dtype, quantization,
                   family, model_kwargs) -> str:
    """What identifies a loaded model in store keys (JSON): a change of any part never reuses an answer."""
    identity = sources(str(model_name_or_path), tokenizer=tokenizer_name_or_path, lora=lora_weights,
                       revision=model_kwargs.get("revision"), gguf_file=model_kwargs.get("gguf_file"),
                       commit=getattr(config, "_commit_hash", None))
    identity.update(dtype=str(dtype), quantization=quantization, engine=family)
    return json.dumps(identity, sort_keys=True)
