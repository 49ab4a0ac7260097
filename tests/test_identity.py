"""The model identity in store keys signs file CONTENT: real tiny checkpoints, real files, a real SQLite store.

The checkpoints of these tests are the issue's ``ckA``/``ckB``: seeds 1 and 2, files of equal size, and
every file of ckB given ckA's exact modification time (to the nanosecond) so that name + size + mtime
cannot tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from simple_generation import SimpleGenerator
from simple_generation.identity import cache_path, signature, sources
from simple_generation.tiny import build_tiny_checkpoint

PROMPTS = ["Hello, my name is", "The quick brown fox", "Tell me what is two plus two?"]
GREEDY = dict(temperature=0, max_new_tokens=6, skip_prompt=True, show_progress_bar=False)


def _same_times(source, target) -> None:
    """Give every file of ``target`` the timestamps of the file of the same name in ``source``."""
    for name in os.listdir(source):
        stat = os.stat(os.path.join(source, name))
        os.utime(os.path.join(target, name), ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    a = build_tiny_checkpoint(root / "ckA", "llama", seed=1)
    b = build_tiny_checkpoint(root / "ckB", "llama", seed=2)
    _same_times(a, b)
    for name in os.listdir(a):
        assert os.path.getsize(a / name) == os.path.getsize(b / name)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    return a, b


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "hash-cache"))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_weights_copied_over_with_cp_p_are_a_new_model_for_the_store(twins, tmp_path):
    """Issue 20 items 2/3: ``cp -p`` of other weights of the same size, same mtime, same inode: no stale answer."""
    a, b = twins
    model = tmp_path / "model"
    shutil.copytree(a, model)
    _same_times(a, model)
    store = str(tmp_path / "answers.sqlite")

    first = SimpleGenerator(str(model), device="cpu", track_emissions=False)
    answers_a = [r.text for r in first.generate(PROMPTS, store=store, **GREEDY)]
    before = os.stat(model / "model.safetensors")

    for name in os.listdir(b):  # cp -p: content replaced in place, size/mtime (to the ns)/inode kept
        shutil.copy2(b / name, model / name)
    after = os.stat(model / "model.safetensors")
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    second = SimpleGenerator(str(model), device="cpu", track_emissions=False)
    assert second.model_identity != first.model_identity
    results = second.generate(PROMPTS, store=store, **GREEDY)
    assert second.last_run.cached == 0 and not any(r.cached for r in results)
    reference = SimpleGenerator(str(b), device="cpu", track_emissions=False)
    answers_b = [r.text for r in reference.generate(PROMPTS, **GREEDY)]
    assert answers_b != answers_a, "the two checkpoints must answer differently for this test to mean anything"
    assert [r.text for r in results] == answers_b

    # The same weights again (same content, another folder state): the identity is about content, so a third
    # load of the unchanged folder resumes from the store.
    third = SimpleGenerator(str(model), device="cpu", track_emissions=False)
    assert third.model_identity == second.model_identity
    third.generate(PROMPTS, store=store, **GREEDY)
    assert third.last_run.cached == len(PROMPTS)


def test_replacing_tokenizer_json_of_a_separate_tokenizer_folder_changes_the_identity(twins, tmp_path):
    """Issue 20 item 4: the tokenizer folder is signed by its files, not its name."""
    a, _ = twins
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(a / name, tokenizer / name)
    store = str(tmp_path / "answers.sqlite")
    first = SimpleGenerator(str(a), tokenizer_name_or_path=str(tokenizer), device="cpu", track_emissions=False)
    first.generate(PROMPTS, store=store, **GREEDY)

    other = build_tiny_checkpoint(tmp_path / "small-vocab", "llama", vocab_size=500)  # other token ids
    stamp = os.stat(tokenizer / "tokenizer.json")
    shutil.copyfile(other / "tokenizer.json", tokenizer / "tokenizer.json")
    os.utime(tokenizer / "tokenizer.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    second = SimpleGenerator(str(a), tokenizer_name_or_path=str(tokenizer), device="cpu", track_emissions=False)
    assert second.model_identity != first.model_identity
    changed = json.loads(second.model_identity)["tokenizer_files"]
    assert ["tokenizer.json", _sha(other / "tokenizer.json")] in changed
    second.generate(PROMPTS, store=store, **GREEDY)
    assert second.last_run.cached == 0


def test_every_file_that_changes_answers_is_signed(twins, tmp_path):
    """Weights, configs, tokenizer files and chat templates of the model, tokenizer and LoRA folders."""
    a, _ = twins
    model = tmp_path / "model"
    shutil.copytree(a, model)
    (model / "README.md").write_text("notes")  # not part of what the model is
    (model / ".hidden.json").write_text("{}")
    names = [name for name, _ in signature(model)]
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"])
    base = sources(str(model), tokenizer=str(a), lora=str(a))
    for name, content in (("chat_template.jinja", "{{ messages }}"), ("generation_config.json", '{"top_k": 3}'),
                          ("special_tokens_map.json", "{}"), ("merges.txt", "a b"), ("tokenizer.model", "x")):
        (model / name).write_text(content)
        now = sources(str(model), tokenizer=str(a), lora=str(a))
        assert now["files"] != base["files"], name
        base = now
    (model / "README.md").write_text("other notes")
    assert sources(str(model), tokenizer=str(a), lora=str(a)) == base

    adapter = tmp_path / "adapter"  # a LoRA folder: its weights and config are signed the same way
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    before = sources(str(model), lora=str(adapter))
    (adapter / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    after = sources(str(model), lora=str(adapter))
    assert after["lora_files"] != before["lora_files"] and after["files"] == before["files"]


def test_hash_cache_hashes_once_and_survives_an_unusable_cache_folder(twins, tmp_path, monkeypatch):
    a, b = twins
    model = tmp_path / "model"
    shutil.copytree(a, model)
    expected = {name: _sha(model / name) for name in os.listdir(model)}
    assert dict(map(tuple, signature(model))) == expected
    with sqlite3.connect(cache_path()) as db:
        rows = dict(db.execute("SELECT path, sha256 FROM hashes").fetchall())
    assert rows == {os.path.realpath(model / name): digest for name, digest in expected.items()}

    # A cache row is used only while the file's stat stamp is unchanged: cp -p over it is hashed again.
    shutil.copy2(b / "model.safetensors", model / "model.safetensors")
    assert dict(map(tuple, signature(model)))["model.safetensors"] == _sha(b / "model.safetensors")

    # The cache folder cannot be made (its parent is a file): the same signature, computed without a cache.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(blocker / "cache"))
    shutil.copy2(a / "model.safetensors", model / "model.safetensors")
    assert dict(map(tuple, signature(model))) == expected
    # A cache file that is not a database: ignored, never fatal.
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "bad-cache"))
    cache_path().parent.mkdir()
    cache_path().write_bytes(b"not sqlite" * 100)
    (model / "config.json").touch()
    assert dict(map(tuple, signature(model))) == expected


def test_processes_sharing_the_hash_cache_agree(twins, tmp_path):
    """Four processes sign the same checkpoint at once through one (new) cache file: same answer, no error."""
    a, _ = twins
    code = ("import json, sys; from simple_generation.identity import signature; "
            "print(json.dumps(signature(sys.argv[1])))")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ)) for _ in range(4)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err for _, err in outputs]
    expected = [[name, _sha(a / name)] for name in sorted(os.listdir(a))]
    assert all(json.loads(out) == expected for out, _ in outputs)
    with sqlite3.connect(cache_path()) as db:
        assert db.execute("SELECT count(*) FROM hashes").fetchone()[0] == len(expected)
