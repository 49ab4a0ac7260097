"""ResultStore on its own: what goes in comes back, what must not be served is not, and a file that is not one
of our stores is refused before a byte of it changes. Real SQLite files in a temporary folder.

(The CLI's refusals of damaged or other-version stores, and copying a closed store, are in test_hardening_cli.py.)
"""

import sqlite3

import pytest

from simple_generation.results import CompletionOutput
from simple_generation.store import SCHEMA_VERSION, ResultStore, StoredAnswer, StoreError, answer_key

MODEL, PROMPT, PARAMS = '{"model": "tiny"}', "<s> Q:", '{"max_new_tokens": 4}'


def _answer(key: str, n: int = 1) -> StoredAnswer:
    return StoredAnswer(key, [f" answer {i} é✓" for i in range(n)], [[10 + i, 11, 2] for i in range(n)],
                        ["stop", "length", "stop_string"][:n], 5, 3 * n)


def test_put_then_get_returns_the_same_answer(tmp_path):
    with ResultStore(tmp_path / "run.sqlite") as store:
        single, several = _answer("a"), _answer("b", n=3)
        store.put(single, MODEL, PROMPT, PARAMS)
        store.put_many([(several, MODEL, PROMPT, PARAMS)])
        found = store.get_many(["a", "b"])
    assert found == {"a": single, "b": several}
    assert found["b"].texts == [" answer 0 é✓", " answer 1 é✓", " answer 2 é✓"]
    assert found["b"].token_ids == [[10, 11, 2], [11, 11, 2], [12, 11, 2]]
    assert found["b"].finish_reasons == ["stop", "length", "stop_string"]
    assert (found["b"].prompt_tokens, found["b"].completion_tokens, found["b"].error) == (5, 9, None)


def test_stored_answer_gives_one_output_per_sequence():
    outputs = _answer("b", n=2).outputs
    assert outputs == [CompletionOutput(0, " answer 0 é✓", [10, 11, 2], "stop"),
                       CompletionOutput(1, " answer 1 é✓", [11, 11, 2], "length")]
    assert all(output.logprobs is None for output in outputs)
    assert StoredAnswer("x", [], [], [], 4, 0, "boom").outputs == []


def test_missing_keys_are_absent_and_duplicates_asked_once(tmp_path):
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put(_answer("a"), MODEL, PROMPT, PARAMS)
        assert store.get_many([]) == {}
        assert list(store.get_many(["a", "nope", "a"])) == ["a"]


def test_many_keys_are_read_in_chunks(tmp_path):
    keys = [f"k{i}" for i in range(1234)]
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put_many([(_answer(key), MODEL, PROMPT, PARAMS) for key in keys])
        assert set(store.get_many(keys + ["absent"])) == set(keys)
        assert store.count() == 1234


def test_failed_answers_are_not_served_nor_counted_and_a_success_replaces_them(tmp_path):
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put(StoredAnswer("a", [], [], [], 5, 0, "CUDA out of memory"), MODEL, PROMPT, PARAMS)
        assert store.get_many(["a"]) == {} and store.count() == 0
        store.put(_answer("a"), MODEL, PROMPT, PARAMS)
        assert store.get_many(["a"]) == {"a": _answer("a")} and store.count() == 1


def test_rows_are_readable_without_us(tmp_path):
    path = tmp_path / "run.sqlite"
    with ResultStore(path) as store:
        store.put(_answer("a", n=2), MODEL, PROMPT, PARAMS)
    db = sqlite3.connect(path)
    row = db.execute("SELECT model, prompt, params, texts, finish_reasons, error FROM results "
                     "WHERE key = 'a'").fetchone()
    db.close()
    assert row == (MODEL, PROMPT, PARAMS, '[" answer 0 é✓", " answer 1 é✓"]', '["stop", "length"]', None)


def test_reopening_keeps_every_answer_in_the_file_alone(tmp_path):
    path = tmp_path / "run.sqlite"
    with ResultStore(path) as store:
        store.put_many([(_answer(f"k{i}", n=2), MODEL, PROMPT, PARAMS) for i in range(30)])
    wal = tmp_path / "run.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at close
    with ResultStore(path) as again:
        assert again.count() == 30
        assert again.get_many(["k7"]) == {"k7": _answer("k7", n=2)}


def test_context_manager_closes_the_connection(tmp_path):
    with ResultStore(tmp_path / "run.sqlite") as store:
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        store.count()


def test_count_of_an_empty_store(tmp_path):
    with ResultStore(tmp_path / "run.sqlite") as store:
        assert store.count() == 0


def _refused_untouched(path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(StoreError, match=match):
        ResultStore(path)
    assert path.read_bytes() == before
    assert not path.with_name(path.name + "-wal").exists()


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"index": 0, "answer": "keep me"}\n' * 100)
    _refused_untouched(path, "not a readable SQLite database")


def test_another_programs_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.execute("INSERT INTO users VALUES ('ada')")
    db.commit()
    db.close()
    _refused_untouched(path, "another program .*users")


def test_a_store_with_missing_columns_is_refused_untouched(tmp_path):
    path = tmp_path / "half.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE results (key TEXT PRIMARY KEY, texts TEXT)")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    db.commit()
    db.close()
    _refused_untouched(path, "not those of a simple-generation store")


def test_a_newer_schema_version_is_refused_untouched(tmp_path):
    path = tmp_path / "run.sqlite"
    with ResultStore(path) as store:
        store.put(_answer("a"), MODEL, PROMPT, PARAMS)
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    _refused_untouched(path, f"schema version {SCHEMA_VERSION + 1}.*upgrade simple-generation")


def test_a_folder_or_a_missing_parent_is_refused(tmp_path):
    with pytest.raises(StoreError, match="not a regular file"):
        ResultStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultStore(tmp_path / "nowhere" / "run.sqlite")


def test_an_empty_sqlite_file_becomes_a_store(tmp_path):
    path = tmp_path / "empty.sqlite"
    path.touch()
    with ResultStore(path) as store:
        store.put(_answer("a"), MODEL, PROMPT, PARAMS)
    with ResultStore(path) as store:
        assert store.count() == 1


def test_answer_key_depends_on_every_part():
    base = answer_key(MODEL, PROMPT, PARAMS, 0)
    assert base == answer_key(MODEL, PROMPT, PARAMS, 0) and len(base) == 64
    others = {answer_key("other", PROMPT, PARAMS, 0), answer_key(MODEL, PROMPT + " ", PARAMS, 0),
              answer_key(MODEL, PROMPT, "{}", 0), answer_key(MODEL, PROMPT, PARAMS, 1),
              answer_key(MODEL + PROMPT, "", PARAMS, 0)}  # parts are separated: no shifting text between them
    assert base not in others and len(others) == 5


# feature: logprobs -------------------------------------------------------------------------------------------
def test_logprobs_round_trip_compactly_and_exactly(tmp_path):
    import struct

    from simple_generation.results import RawLogprobs

    def f32(x):
        return struct.unpack("<f", struct.pack("<f", x))[0]

    sequences = [RawLogprobs([10, 11, 2], [f32(-0.1), f32(-2.5), f32(-7.25)], [[10, 4], [11, 3], [5, 2]],
                             [[f32(-0.1), f32(-3.0)], [f32(-2.0), f32(-2.5)], [f32(-1.0), f32(-7.25)]])]
    prompt = RawLogprobs([7, 8], [f32(-5.5), f32(-1.25)], [[], []], [[], []])
    answer = StoredAnswer("a", [" x"], [[10, 11, 2]], ["stop"], 3, 3, logprobs=sequences, prompt_logprobs=prompt)
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put(answer, MODEL, PROMPT, PARAMS)
        store.put(_answer("b"), MODEL, PROMPT, PARAMS)
        found = store.get_many(["a", "b"])
    assert found["a"] == answer and found["a"].logprobs[0].top_logprobs[2] == [f32(-1.0), f32(-7.25)]
    assert found["b"].logprobs is None and found["b"].prompt_logprobs is None


_V1_SCHEMA = """CREATE TABLE results (key TEXT PRIMARY KEY, model TEXT, prompt TEXT, params TEXT, texts TEXT,
    token_ids TEXT, finish_reasons TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, error TEXT, created_at REAL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO results VALUES ('old', 'm', 'p', '{}', '[" kept"]', '[[5, 2]]', '["stop"]', 4, 2, NULL, 0.0);"""


def test_a_schema_1_store_is_upgraded_in_place_keeping_its_answers(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()
    with ResultStore(path, check_integrity=True) as store:
        assert store.get_many(["old"]) == {"old": StoredAnswer("old", [" kept"], [[5, 2]], ["stop"], 4, 2)}
        store.put(_answer("new"), MODEL, PROMPT, PARAMS)
    db = sqlite3.connect(path)
    version = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]
    columns = [info[1] for info in db.execute("PRAGMA table_info(results)")]
    db.close()
    assert version == str(SCHEMA_VERSION) == "2" and columns[-1] == "logprobs"
    with ResultStore(path) as store:  # opened again: nothing more to do
        assert set(store.get_many(["old", "new"])) == {"old", "new"}
