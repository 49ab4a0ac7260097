"""The job layer (``simple_generation.jobs``): where the store lives, windows in order, the near-duplicate
pre-pass, failures, resume; and the one table of file formats."""

import json
import os
from pathlib import Path

import pytest

from simple_generation import SimpleGenerator
from simple_generation.io import InputRecord, OpenAIRequest, OrderedWriter, detect_format, output_format_for
from simple_generation.io.formats import INPUT_FORMATS, OUTPUT_FORMATS, input_format_of, output_format_of
from simple_generation.io.sources import InputSource, ListSource, scan_source
from simple_generation.jobs import JobOptions, JobProgress, dry_run, open_store, run_job, store_path
from simple_generation.store import StoreError

from .conftest import PROMPTS

GREEDY = {"max_new_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def gen(llama_path):
    return SimpleGenerator(llama_path, device="cpu", track_emissions=False)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def _run(gen, items, path, **options):
    options = {"generation": dict(GREEDY), "show_progress": False, "skip_prompt": True, **options}
    with OrderedWriter(path) as writer:
        summary = run_job(gen, ListSource(items), writer, JobOptions(**options))
    return summary, _jsonl(path)


# ------------------------------------------------------------------------------------------ where the store is
def test_store_path_explicit_none_and_beside_the_output(tmp_path):
    out = tmp_path / "answers.jsonl"
    assert store_path(output=out) == f"{out}.sqlite"
    assert store_path(store=tmp_path / "s.sqlite", output=out) == str(tmp_path / "s.sqlite")
    assert store_path(output=out, no_store=True) is None
    assert store_path(store=tmp_path / "s.sqlite", no_store=True) is None
    assert store_path() is None and store_path(output="-") is None


@pytest.mark.skipif(not os.path.exists("/dev/null") or not hasattr(os, "mkfifo"), reason="POSIX devices")
def test_no_store_beside_a_device_or_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert store_path(output="/dev/null") is None
    assert store_path(output=fifo) is None
    assert store_path(store=tmp_path / "kept.sqlite", output="/dev/null") == str(tmp_path / "kept.sqlite")


def test_store_path_in_a_cache_dir_is_keyed_by_content_and_settings(tmp_path):
    first = store_path(cache_dir=tmp_path, content=b"Hello\n", key=".txt{}")
    assert Path(first).parent == tmp_path and Path(first).name.startswith("batch-") and first.endswith(".sqlite")
    assert store_path(cache_dir=tmp_path, content=b"Hello\n", key=".txt{}") == first
    assert store_path(cache_dir=tmp_path, content=b"Hello!\n", key=".txt{}") != first
    assert store_path(cache_dir=tmp_path, content=b"Hello\n", key=".txt{\"seed\": 1}") != first


def test_open_store_checks_before_anything_runs(tmp_path):
    assert open_store(None) is None
    assert open_store(tmp_path / "absent.sqlite", create=False) is None
    assert not (tmp_path / "absent.sqlite").exists()
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database, but someone's notes\n", encoding="utf-8")
    with pytest.raises(StoreError):
        open_store(bad)
    assert bad.read_text(encoding="utf-8") == "not a database, but someone's notes\n"


# ------------------------------------------------------------------------------------------ the formats table
def test_one_table_of_formats():
    assert INPUT_FORMATS == ("txt", "jsonl", "json", "csv", "parquet", "dataset")
    assert OUTPUT_FORMATS == ("jsonl", "csv", "parquet", "openai-batch")
    assert [input_format_of(f"a{s}") for s in (".TXT", ".ndjson", ".json", ".csv", ".pq", ".xyz")] == \
        ["txt", "jsonl", "json", "csv", "parquet", None]
    assert [output_format_of(f"a{s}") for s in (".jsonl", ".json", ".CSV", ".parquet", ".txt")] == \
        ["jsonl", "jsonl", "csv", "parquet", None]
    assert detect_format("a.ndjson") == "jsonl" and detect_format("a.unknown") == "sniff"
    assert output_format_for("a.json") == "jsonl" and output_format_for("a.txt") == "jsonl"


def test_mixed_parquet_columns_are_kept(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from simple_generation.io.writers import parquet_table

    table = parquet_table([{"answer": "a", "extra": None}, {"answer": ["b", "c"], "extra": 3}])
    assert table.to_pylist() == [{"answer": "a", "extra": None}, {"answer": '["b", "c"]', "extra": 3}]
    out = tmp_path / "out.parquet"
    with OrderedWriter(out, row_group_size=1) as writer:
        writer.add(0, {"index": 0, "answer": "a"})
        writer.add(1, {"index": 1, "answer": ["b", "c"]})
    assert pq.read_table(out).to_pylist() == [{"index": 0, "answer": "a"}, {"index": 1, "answer": '["b", "c"]'}]


# ------------------------------------------------------------------------------------------ sources
def test_input_source_prompts_then_file_with_limit(tmp_path):
    source_file = tmp_path / "in.jsonl"
    source_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a", "b", "c")), encoding="utf-8")
    with InputSource(["x"], source_file, limit=3) as source:
        first = [(r.index, r.prompt, r.source) for r in source.records()]
        assert [(r.index, r.prompt) for r in source.records()] == [(i, p) for i, p, _ in first]  # re-iterable
    assert first == [(0, "x", "--prompt 1"), (1, "a", f"{source_file}:1"), (2, "b", f"{source_file}:2")]


def test_scan_source_reports_invalid_records_and_problems(tmp_path):
    source_file = tmp_path / "in.jsonl"
    source_file.write_text('{"prompt": "ok"}\n{"text": 3}\n{"prompt": "cut \\ud83d"}\n{"prompt": "ok"}\n',
                           encoding="utf-8")
    report, problems = scan_source(InputSource(path=source_file))
    assert report.records == 3 and report.error_count == 1 and "in.jsonl:2" in report.errors[0]
    assert report.duplicates == 1
    assert list(problems) == [2] and problems[2][0] == f"{source_file}:3" and "lone surrogate" in problems[2][1]


# ------------------------------------------------------------------------------------------ jobs on a real model
def test_windows_keep_input_order_and_answers(gen, tmp_path):
    prompts = PROMPTS[:7]
    seen: list[JobProgress] = []
    summary, records = _run(gen, prompts, tmp_path / "out.jsonl", window_size=3, total=len(prompts),
                            on_progress=lambda p: seen.append(JobProgress(p.done, p.total, p.tokens, p.cached)))
    expected = gen(prompts, skip_prompt=True, show_progress_bar=False, **GREEDY)
    assert [r["index"] for r in records] == list(range(7))
    assert [r["prompt"] for r in records] == prompts
    assert [r["answer"] for r in records] == expected
    assert summary.records == summary.written == 7 and summary.failures == [] and summary.generated_tokens > 0
    assert [p.done for p in seen] == list(range(8)) and seen[-1].total == 7
    assert seen[-1].tokens == summary.generated_tokens


def test_resume_generates_nothing_the_store_holds(gen, tmp_path):
    store = str(tmp_path / "answers.sqlite")
    first, records = _run(gen, PROMPTS[:4], tmp_path / "a.jsonl", store=store, window_size=2)
    assert first.generated_tokens > 0 and first.cached == 0
    again, records_again = _run(gen, PROMPTS[:4], tmp_path / "b.jsonl", store=store, window_size=3)
    assert again.generated_tokens == 0 and again.cached == 4
    assert [r["answer"] for r in records_again] == [r["answer"] for r in records]
    more, _ = _run(gen, PROMPTS[:5], tmp_path / "c.jsonl", store=store)
    assert more.cached == 4 and 0 < more.generated_tokens <= GREEDY["max_new_tokens"]


def test_failures_are_recorded_and_the_job_goes_on(gen, tmp_path):
    items = [InputRecord(index=0, prompt="Hello", source="in:1"),
             InputRecord(index=1, prompt="cut \ud83d", source="in:2"),
             InputRecord(index=2, prompt="What is 2 + 2?", source="in:3")]
    summary, records = _run(gen, items, tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[0]["error"] is None and records[2]["error"] is None and records[2]["answer"]
    assert "lone surrogate" in records[1]["error"]
    assert [(i, where) for i, where, _ in summary.failures] == [(1, "in:2")] and summary.failed == 1
    with pytest.raises(ValueError, match="in:2"), OrderedWriter(tmp_path / "raise.jsonl") as writer:
        run_job(gen, ListSource(items), writer, JobOptions(on_error="raise", generation=GREEDY, show_progress=False))


def test_near_duplicate_pre_pass(gen, tmp_path):
    pytest.importorskip("datasketch")
    text = "Write a short story about a robot who learns to paint the sea at night."
    items = [text, "What is 2 + 2?", text.replace("night", "night!"), "Hello"]
    summary, records = _run(gen, items, tmp_path / "out.jsonl", near_dedup=0.8, window_size=2)
    assert summary.near_duplicates == 1
    assert records[2]["duplicate_of"] == 0 and records[2]["answer"] is None
    assert [r.get("duplicate_of") for r in records[:2] + records[3:]] == [None, None, None]
    assert all(r["answer"] for i, r in enumerate(records) if i != 2)


def test_openai_completions_records_get_no_template(llama_path, tmp_path):
    templated = SimpleGenerator(llama_path, device="cpu", track_emissions=False, system_prompt="vicuna_v1.1")
    chat = OpenAIRequest(url="/v1/chat/completions", method="POST", model="m")
    plain = OpenAIRequest(url="/v1/completions", method="POST", model="m")
    items = [InputRecord(index=0, prompt="Once upon a time", source="a", openai=chat, custom_id="a"),
             InputRecord(index=1, prompt="Once upon a time", source="b", openai=plain, custom_id="b")]
    _, records = _run(templated, items, tmp_path / "out.jsonl", output_format="openai-batch")
    assert records[0]["prompt_tokens"] > records[1]["prompt_tokens"]  # the vicuna template around the chat one
    direct = templated.generate(["Once upon a time"], plain_prompts=True, show_progress_bar=False, skip_prompt=True,
                                **GREEDY)[0]
    assert records[1]["answer"] == direct.text and records[1]["prompt_tokens"] == direct.prompt_tokens


def test_dry_run_reports_without_a_model(tmp_path):
    source = ListSource(["Hello", "Hello", "cut \ud83d"])
    report, problems = scan_source(source)
    result = dry_run(source, report, problems, store=str(tmp_path / "s.sqlite"), output="out.jsonl")
    assert result.lines[0] == "input: prompts (3 records)"
    assert "exact duplicates (same prompt and parameters): 1" in result.lines
    assert any("cannot be generated from: 1" in line for line in result.lines)
    assert f"store: {tmp_path / 's.sqlite'} (new)" in result.lines and result.lines[-1] == "output: out.jsonl"
    assert not result.store_error and not (tmp_path / "s.sqlite").exists()


@pytest.mark.slow
def test_cli_ray_takes_the_job_options_and_shares_the_store_with_a_local_run(llama_path, tmp_path):
    """--ray with --prompt, --limit and --store: the same job on Ray actors; a local rerun over the same store
    generates nothing and writes the same records."""
    pytest.importorskip("ray")
    from simple_generation.cli import main
    from simple_generation.store import ResultStore

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]), encoding="utf-8")
    common = [llama_path, "--prompt", "Hello", "--input", str(source), "--limit", "3", "--store",
              str(tmp_path / "s.sqlite"), "--temperature", "0", "--max-new-tokens", "4", "--skip-prompt", "--quiet",
              "--no-emissions"]
    assert main(["run", *common, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--replicas", "1"]) == 0
    with ResultStore(tmp_path / "s.sqlite") as store:
        stored = store.count()
    assert stored == 3
    assert main(["run", *common, "--output", str(tmp_path / "local.jsonl")]) == 0
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.count() == stored  # nothing generated again
    ray_records, local_records = _jsonl(tmp_path / "ray.jsonl"), _jsonl(tmp_path / "local.jsonl")
    assert [r["index"] for r in ray_records] == [0, 1, 2] and ray_records == local_records
