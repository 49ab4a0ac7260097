"""Issue 20, files and command line: stores and outputs never lost, unicode that never blocks a job, OpenAI
Batch shapes, batch defaults and typos found before the model loads. Real processes, files and SQLite."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simple_generation.io import OrderedWriter
from simple_generation.store import ResultStore, StoredAnswer, StoreError

CLI = [sys.executable, "-m", "simple_generation.cli"]
QUIET = ["--quiet", "--no-emissions"]
LOADED = "Loaded "  # the generator's load line: absent when a check failed first


def run_cli(args, cwd, timeout=300, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, **kwargs)


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def write_prompts(path, n):
    path.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(n)), encoding="utf-8")
    return path


def make_store(path, rows=50):
    with ResultStore(path) as store:
        for i in range(rows):
            store.put(StoredAnswer(f"k{i}", ["answer " * 20], [[1, 2]], ["stop"], 3, 2), "model", "p" * 300, "{}")
    return path


# ------------------------------------------------------------------ 5: the store is checked before anything
def test_corrupt_store_is_refused_before_the_output_or_the_model(llama_path, tmp_path):
    source = write_prompts(tmp_path / "in.jsonl", 3)
    output = tmp_path / "B.jsonl"
    output.write_text('{"index": 0, "answer": "complete"}\n' * 300, encoding="utf-8")
    before = output.read_bytes()
    store = make_store(tmp_path / "B.jsonl.sqlite")
    os.truncate(store, 3000)
    result = run_cli([llama_path, "--input", source, "--output", output, "--no-emissions"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "B.jsonl.sqlite" in result.stderr and "cannot be used as a simple-generation store" in result.stderr
    assert LOADED not in result.stderr
    assert output.read_bytes() == before


# ------------------------------------------------------------------ 6: an output that is a store
@pytest.mark.parametrize("case", ["another-store", "same-path", "other-spelling", "symlink", "wal"])
def test_output_that_is_a_store_is_refused(llama_path, tmp_path, case):
    source = write_prompts(tmp_path / "in.jsonl", 2)
    store = make_store(tmp_path / "E4.jsonl.sqlite")
    (tmp_path / "sub").mkdir()
    args = {
        "another-store": ["--output", "E4.jsonl.sqlite"],
        "same-path": ["--store", "X.db", "--output", "X.db"],
        "other-spelling": ["--store", "sub/../X.db", "--output", str(tmp_path / "X.db")],
        "symlink": ["--store", "E4.jsonl.sqlite", "--output", "link.jsonl"],
        "wal": ["--store", "E4.jsonl.sqlite", "--output", "E4.jsonl.sqlite-wal"],
    }[case]
    if case == "symlink":
        (tmp_path / "link.jsonl").symlink_to(store)
    before = store.read_bytes()
    result = run_cli([llama_path, "--input", source, *args, *QUIET], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "refusing" in result.stderr or "is the store" in result.stderr
    assert store.read_bytes() == before
    assert not (tmp_path / "X.db").exists()


# ------------------------------------------------------------------ 7: --limit 0
def test_limit_zero_is_a_usage_error_that_keeps_the_output(llama_path, tmp_path):
    source = write_prompts(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    output.write_text("x\n" * 300, encoding="utf-8")
    result = run_cli([llama_path, "--input", source, "--output", output, "--limit", "0", *QUIET], tmp_path)
    assert result.returncode == 2 and "--limit" in result.stderr
    assert output.read_text(encoding="utf-8") == "x\n" * 300


# ------------------------------------------------------------------ 8: parquet goes through a temporary name
def test_parquet_output_is_cleared_at_start_and_renamed_at_the_end(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "answers.parquet"
    with OrderedWriter(target, row_group_size=2) as old:
        for i in range(3):
            old.add(i, {"index": i, "answer": "old"})
    writer = OrderedWriter(target, row_group_size=2)
    assert not target.exists()  # the older run's file is gone: it can never pass for this run's result
    for i in range(4):
        writer.add(i, {"index": i, "answer": "new"})
    assert not target.exists() and (tmp_path / "answers.parquet.partial").exists()
    writer.close()
    assert not (tmp_path / "answers.parquet.partial").exists()
    assert pq.read_table(target).column("answer").to_pylist() == ["new"] * 4


# ------------------------------------------------------------------ 9: another program's database
def test_foreign_database_is_refused_without_writing_to_it(llama_path, tmp_path):
    source = write_prompts(tmp_path / "in.jsonl", 2)
    foreign = tmp_path / "foreign.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO things (name) VALUES ('kept')")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    result = run_cli([llama_path, "--input", source, "--output", "out.jsonl", "--store", foreign, *QUIET], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "another program" in result.stderr and "things" in result.stderr and LOADED not in result.stderr
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("foreign")) == ["foreign.db"]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow  # the dry run loads the tokenizer
@pytest.mark.parametrize("version, words", [("3", "upgrade simple-generation"), ("0", "schema version 0")])
def test_store_of_another_schema_version_is_a_clear_error(llama_path, tmp_path, version, words):
    source = write_prompts(tmp_path / "in.jsonl", 2)
    store = make_store(tmp_path / "out.jsonl.sqlite")
    db = sqlite3.connect(store)
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (version,))
    db.commit()
    db.close()
    result = run_cli([llama_path, "--input", source, "--output", "out.jsonl", *QUIET], tmp_path)
    assert result.returncode == 2 and words in result.stderr and LOADED not in result.stderr
    dry = run_cli([llama_path, "--input", source, "--output", "out.jsonl", "--dry-run", *QUIET], tmp_path)
    assert dry.returncode == 2 and words in dry.stdout


def test_library_store_refuses_a_foreign_file_untouched(tmp_path):
    text = tmp_path / "notes.jsonl"
    text.write_text('{"a": 1}\n', encoding="utf-8")
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        ResultStore(text)
    assert text.read_text(encoding="utf-8") == '{"a": 1}\n'


# ------------------------------------------------------------------ 10: no store beside a device
@pytest.mark.slow
def test_no_store_beside_dev_null(llama_path, tmp_path):
    result = run_cli([llama_path, "--prompt", "hi", "--output", "/dev/null", "--max-new-tokens", "2",
                      "--no-emissions"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No store: --output /dev/null is not a regular file" in result.stderr
    assert not os.path.exists("/dev/null.sqlite")


# ------------------------------------------------------------------ 11: stdin copy removed
@pytest.mark.slow
def test_stdin_copy_leaves_nothing_after_sigterm(llama_path, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    data = "".join(json.dumps({"prompt": f"a long enough prompt {i}"}) + "\n" for i in range(400))
    process = subprocess.Popen(CLI + [llama_path, "--input", "-", "--input-format", "jsonl", "--output", "out.jsonl",
                                      "--max-new-tokens", "64", "--batch-size", "4", "--no-emissions"],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp)})
    process.stdin.write(data)
    process.stdin.close()
    lines = []
    for line in process.stderr:  # wait until it generates
        lines.append(line)
        if line.startswith("Store out.jsonl.sqlite"):
            break
    assert not list(temp.iterdir())  # the copy has no name, even while the run uses it
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, "".join(lines) + rest
    assert "interrupted" in rest
    assert not [p for p in temp.iterdir() if p.name.startswith("simple-generation-stdin-")]
    with ResultStore(tmp_path / "out.jsonl.sqlite") as store:  # the store is whole and usable
        assert store.count() >= 0


# ------------------------------------------------------------------ 12: lone surrogates
SURROGATES = ('{"prompt": "hello there", "id": 1}\n{"prompt": "ok", "id": "\\udfff"}\n'
              '{"prompt": "cut emoji \\ud83d"}\n{"prompt": "what is 2+2"}\n')


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_lone_surrogates_are_recorded_per_record(llama_path, tmp_path, suffix):
    source = tmp_path / "in.jsonl"
    source.write_text(SURROGATES, encoding="utf-8")
    output = tmp_path / f"out{suffix}"
    args = [llama_path, "--input", source, "--output", output, "--max-new-tokens", "3", *QUIET]
    result = run_cli(args, tmp_path)
    assert result.returncode == 3, result.stderr
    assert "in.jsonl:3" in result.stderr and "lone surrogate" in result.stderr and "codec" not in result.stderr
    if suffix == ".jsonl":
        records = jsonl(output)
        assert [r["index"] for r in records] == [0, 1, 2, 3]
        assert records[1]["id"] == "\udfff" and records[1]["error"] is None  # carried exactly (escaped JSON)
        assert "lone surrogate" in records[2]["error"] and records[3]["error"] is None
    else:
        text = output.read_text(encoding="utf-8")
        assert "\\udfff" in text and text.count("\n") == 5
    again = run_cli(args, tmp_path)  # a rerun from the store works the same
    assert again.returncode == 3, again.stderr


@pytest.mark.slow  # the dry run loads the tokenizer
def test_lone_surrogate_prompt_is_found_up_front(llama_path, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(SURROGATES, encoding="utf-8")
    output = tmp_path / "out.jsonl"
    output.write_text("old\n", encoding="utf-8")
    dry = run_cli([llama_path, "--input", source, "--output", output, "--dry-run", *QUIET], tmp_path)
    assert dry.returncode == 0 and "in.jsonl:3: the prompt holds a lone surrogate" in dry.stdout
    strict = run_cli([llama_path, "--input", source, "--output", output, "--on-error", "raise", *QUIET], tmp_path)
    assert strict.returncode == 2 and "in.jsonl:3" in strict.stderr and LOADED not in strict.stderr
    assert output.read_text(encoding="utf-8") == "old\n"


def test_library_records_a_lone_surrogate_prompt(llama_path):
    from simple_generation import SimpleGenerator

    gen = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    results = gen.generate(["fine", "bad \udfff"], max_new_tokens=2, temperature=0, on_error="record",
                           show_progress_bar=False)
    assert results[0].error is None and "lone surrogate" in results[1].error
    with pytest.raises(ValueError, match="lone surrogate"):
        gen.generate(["bad \udfff"], max_new_tokens=2, show_progress_bar=False)


# ------------------------------------------------------------------ 17: OpenAI Batch shapes
OPENAI = ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
          '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}\n'
          '{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "m", '
          '"prompt": "Once upon", "max_tokens": 3}}\n')


@pytest.mark.slow
def test_openai_batch_output_has_continuations_and_completions_no_template(llama_path, tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text(OPENAI, encoding="utf-8")
    result = run_cli([llama_path, "--input", source, "--output", "out.jsonl", "--output-format", "openai-batch",
                      "--system-prompt", "vicuna_v1.1", "--no-skip-prompt", *QUIET], tmp_path)
    assert result.returncode == 0, result.stderr
    chat, completion = jsonl(tmp_path / "out.jsonl")
    content = chat["response"]["body"]["choices"][0]["message"]["content"]
    text = completion["response"]["body"]["choices"][0]["text"]
    assert "USER: Hi" not in content and not text.startswith("Once upon")
    prompts = dict(sqlite3.connect(tmp_path / "out.jsonl.sqlite").execute("SELECT prompt, texts FROM results"))
    assert "Once upon" in prompts  # the completion request was fed as it is: no template around it
    assert any("USER: Hi ASSISTANT:" in p for p in prompts)
    assert json.loads(prompts["Once upon"]) == [text] and [content] in map(json.loads, prompts.values())


# ------------------------------------------------------------------ 19: OpenAI custom_ids, per-record settings
def test_duplicate_custom_id_names_both_lines(llama_path, tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text(OPENAI + OPENAI.splitlines()[0] + "\n", encoding="utf-8")
    result = run_cli([llama_path, "--input", source, "--output", "out.jsonl", *QUIET], tmp_path)
    assert result.returncode == 2
    assert "batch.jsonl:3: custom_id 'a' is already used at " in result.stderr and "batch.jsonl:1" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("key", ["num_beams", "max_length"])
def test_per_record_generation_setting_is_refused(llama_path, tmp_path, key):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", key: 4}) + "\n",
                      encoding="utf-8")
    result = run_cli([llama_path, "--input", source, "--dry-run", *QUIET], tmp_path)
    assert result.returncode == 2 and "in.jsonl:2" in result.stderr and key in result.stderr


# ------------------------------------------------------------------ 20: WAL folded in at close
def test_closed_store_is_one_copyable_file(tmp_path):
    make_store(tmp_path / "run.sqlite", rows=200)
    assert not (tmp_path / "run.sqlite-wal").exists() or (tmp_path / "run.sqlite-wal").stat().st_size == 0
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "run.sqlite", tmp_path / "copy" / "run.sqlite")  # the .sqlite alone
    with ResultStore(tmp_path / "copy" / "run.sqlite") as copy:
        assert copy.count() == 200


# ------------------------------------------------------------------ 21: huge prompts found cheaply
def test_huge_prompt_is_too_long_without_tokenizing_it(llama_path):
    from simple_generation import SimpleGenerator

    gen = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    huge = "word " * 4_000_000  # 20 MB
    started = time.perf_counter()
    results = gen.generate([huge, "fine"], max_new_tokens=2, temperature=0, on_error="record", show_progress_bar=False)
    assert time.perf_counter() - started < 20
    assert "at least" in results[0].error and "more than the model's context of 256" in results[0].error
    assert results[1].error is None


def test_truncated_huge_prompt_keeps_its_end(llama_path, monkeypatch):
    from simple_generation import SimpleGenerator, pipeline

    gen = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    text = " ".join(f"w{i}" for i in range(20_000)) + " and the question at the end?"
    call = dict(max_new_tokens=4, temperature=0, truncate_prompts=True, skip_prompt=True, show_progress_bar=False)
    probed = gen.generate([text], **call)[0]
    monkeypatch.setattr(pipeline, "PROBE_CHARS_PER_TOKEN", 10**9)  # tokenize all of it, as before
    whole = gen.generate([text], **call)[0]
    assert probed.error is None and (probed.text, probed.prompt_tokens) == (whole.text, whole.prompt_tokens)


# ------------------------------------------------------------------ 25: batch defaults, shown in --help
def test_help_shows_every_generation_default():
    result = subprocess.run(CLI + ["run", "--help"], capture_output=True, text=True, timeout=120)
    out = " ".join(result.stdout.split())
    for text in ("(default: 512)", "(default: 0, greedy)", "only when sampling (default: 1.0)",
                 "only when sampling (default: 50)", "--skip-prompt, --no-skip-prompt", "(default: True)"):
        assert text in out, text


@pytest.mark.slow
def test_run_defaults_are_greedy_answer_only(llama_path, tmp_path):
    from simple_generation import SimpleGenerator
    from simple_generation.defaults import BATCH_DEFAULTS

    result = run_cli([llama_path, "--prompt", "Tell me a story", "--output", "out.jsonl", *QUIET], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = SimpleGenerator(llama_path, device="cpu", track_emissions=False).generate(
        ["Tell me a story"], max_new_tokens=BATCH_DEFAULTS.max_new_tokens, temperature=0, skip_prompt=True,
        show_progress_bar=False)[0]
    assert jsonl(tmp_path / "out.jsonl")[0]["answer"] == expected.text


# ------------------------------------------------------------------ 27: typos before the model loads
@pytest.mark.parametrize("argv, message", [
    (["rnu", "{model}", "--prompt", "x"], "unknown command 'rnu', did you mean 'run'?"),
    (["{model}", "--prompt", "x", "--max-tokens", "3"], "--max-tokens: did you mean --max-new-tokens?"),
    (["{model}", "--prompt", "x", "--temprature", "0.5"], "did you mean --temperature?"),
    (["{model}", "--prompt", "x", "--generation", "repetiton_penalty=1.1"], "did you mean 'repetition_penalty'?"),
    (["{model}", "--prompt", "x", "--generation", "foo_bar=1"], "--generation foo_bar: not a generation setting"),
    (["{model}", "--prompt", "x", "-n", "2"], "-n 2 needs sampling"),
])
def test_typos_are_usage_errors_before_loading(llama_path, tmp_path, argv, message):
    result = run_cli([a.replace("{model}", llama_path) for a in argv], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert LOADED not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_model_named_like_a_command_still_runs_as_the_model():
    from simple_generation.cli import _with_subcommand

    assert _with_subcommand(["char", "--prompt", "x"]) == ["run", "char", "--prompt", "x"]


def test_generation_field_list_matches_transformers():
    import inspect

    from transformers import GenerationConfig

    from simple_generation.sampling_params import GENERATION_CONFIG_FIELDS

    real = set(GenerationConfig().to_dict()) | set(inspect.signature(GenerationConfig).parameters)
    bookkeeping = {"_from_model_config", "transformers_version", "kwargs", "cache_config", "compile_config",
                   "continuous_batching_config", "disable_compile", "is_assistant", "max_cache_len",
                   "output_attentions", "output_hidden_states", "output_logits", "output_scores",
                   "prefill_chunk_size", "return_dict_in_generate"}
    assert real - bookkeeping <= GENERATION_CONFIG_FIELDS
