"""Ray jobs from the command line and generate_dataset: the local path's options and guarantees (the store,
--limit, --near-dedup, --dry-run, --prompt), the local path's reports of bad records, and no Ray process left
behind. Real files, real tiny checkpoints, a real local Ray started by the job itself, and the real CLI in
subprocesses (SIGKILL, SIGINT)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.data")
import psutil  # noqa: E402 - installed with accelerate

from simple_generation.cluster import RayGenerator, _chunks, _renumber, generate_dataset  # noqa: E402
from simple_generation.tiny import build_tiny_checkpoint  # noqa: E402

GREEDY = dict(temperature=0, max_new_tokens=4, skip_prompt=True)
QUIET = dict(model_kwargs={"track_emissions": False}, show_progress=False)
REPO = str(Path(__file__).resolve().parents[1])
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def write_prompts(path: Path, n: int, **replace) -> Path:
    rows = [{"id": f"r{i}", "prompt": f"Record {i}: the quick brown fox"} for i in range(n)]
    for index, value in replace.items():
        rows[int(index.lstrip("r"))]["prompt"] = value
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stored(store: Path) -> int:
    if not store.exists():
        return 0
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM results WHERE error IS NULL").fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        return 0
    finally:
        db.close()


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simple_generation.cli", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "hash-cache"))


# ---------------------------------------------------------------------------------------------- no Ray started
def test_chunks_keep_every_copy_of_a_prompt_together_and_positions_in_order():
    """Copies of a sampled prompt are numbered within one call: they must share a chunk (in input order)."""
    prompts = ["a", "b", "a", "c", "d", "a", "b", "e"]
    params = [None, None, None, {"temperature": 0.5}, None, {"temperature": 0.5}, None, None]
    chunks = _chunks(prompts, params, range(8), size=2)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(8))
    assert all(chunk == sorted(chunk) for chunk in chunks)
    where = {i: n for n, chunk in enumerate(chunks) for i in chunk}
    assert where[0] == where[2] and where[1] == where[6]  # the same prompt and parameters: one chunk
    assert where[5] != where[0]  # "a" with other parameters is another request
    assert _chunks(prompts, None, [1, 3, 4], size=8) == [[1, 3, 4]]


def test_replica_error_messages_name_the_calls_prompts():
    chunk = [10, 12, 17]
    assert _renumber("prompt 2 has 900 tokens, more than the model's context of 256", chunk) == \
        "prompt 17 has 900 tokens, more than the model's context of 256"
    assert _renumber("params[1]: bad; texts[0] is empty", chunk) == "params[12]: bad; texts[10] is empty"
    assert _renumber("Generation failed for the batch of prompts [0, 2]: boom", chunk) == \
        "Generation failed for the batch of prompts [10, 17]: boom"
    assert _renumber("1 prompt(s) leave no room (prompt 1 has 300 tokens)", chunk) == \
        "1 prompt(s) leave no room (prompt 12 has 300 tokens)"


def test_ray_generator_checks_its_arguments_and_is_a_context_manager():
    with pytest.raises(ValueError, match="replicas"):
        RayGenerator("model", replicas=0)
    with pytest.raises(RuntimeError, match="context manager"):
        next(iter(RayGenerator("model").stream(["Hi"])))


def test_old_output_shapes_are_refused_before_ray_starts(llama_path, tmp_path):
    """ordered=False (a folder of part files) is gone, and an old folder of parts is never taken as the output."""
    source = write_prompts(tmp_path / "in.jsonl", 3)
    with pytest.raises(ValueError, match="ordered=False"):
        generate_dataset(str(source), llama_path, str(tmp_path / "out"), ordered=False, **GREEDY, **QUIET)
    (tmp_path / "parts").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        generate_dataset(str(source), llama_path, str(tmp_path / "parts"), **GREEDY, **QUIET)
    (tmp_path / "not-a-store.sqlite").write_text("hello")
    with pytest.raises(ValueError, match="cannot be used as a simple-generation store"):
        generate_dataset(str(source), llama_path, str(tmp_path / "o.jsonl"), store=str(tmp_path / "not-a-store.sqlite"),
                         **GREEDY, **QUIET)
    assert not (tmp_path / "o.jsonl").exists() and (tmp_path / "not-a-store.sqlite").read_text() == "hello"


def test_cli_ray_reports_invalid_records_like_the_local_path(llama_path, tmp_path):
    """One line each, before Ray starts; nothing left behind."""
    source = write_prompts(tmp_path / "in.jsonl", 5, r2=7)
    local = cli("run", llama_path, "--input", str(source), "--output", str(tmp_path / "local.jsonl"), cwd=tmp_path)
    ray = cli("run", llama_path, "--input", str(source), "--output", str(tmp_path / "ray.jsonl"), "--ray",
              cwd=tmp_path)
    (_, local_err), (_, ray_err) = local.communicate(timeout=300), ray.communicate(timeout=300)
    assert local.returncode == ray.returncode == 2
    assert 'in.jsonl:3: record 2: field "prompt" must be a string' in ray_err
    assert [line for line in ray_err.splitlines() if "error" in line] == \
        [line for line in local_err.splitlines() if "error" in line]
    assert "Ray" not in ray_err and "Traceback" not in ray_err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hash-cache") == ["in.jsonl"]


def test_cli_ray_dry_run_reports_without_starting_ray(llama_path, tmp_path):
    source = write_prompts(tmp_path / "in.jsonl", 4, r3="Record 0: the quick brown fox")
    run = cli("run", llama_path, "--input", str(source), "--output", "out.jsonl", "--ray", "--replicas", "2",
              "--dry-run", "--store", "s.sqlite", "--limit", "4", cwd=tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "input: " in out and "(4 records)" in out and "exact duplicates (same prompt and parameters): 1" in out
    assert "store: s.sqlite (new)" in out and "output: out.jsonl" in out
    assert "Ray" not in err and not (tmp_path / "out.jsonl").exists() and not (tmp_path / "s.sqlite").exists()


# ---------------------------------------------------------------------------------------------- real Ray jobs
@pytest.mark.slow
def test_cli_ray_with_store_limit_near_dedup_and_prompt_equals_the_local_run(llama_path, tmp_path):
    """--ray takes the local path's job options; its store serves a local rerun (one way to resume)."""
    source = write_prompts(tmp_path / "in.jsonl", 8, r4="Record 3: the quick brown fox!")  # a near-duplicate of 3
    common = ["run", llama_path, "--prompt", "Hello there", "--input", str(source), "--limit", "7", "--near-dedup",
              "0.8", "--temperature", "0", "--max-new-tokens", "4", "--no-emissions"]
    ray = cli(*common, "--output", "ray.jsonl", "--store", "ray.sqlite", "--ray", "--replicas", "2", cwd=tmp_path)
    _, ray_err = ray.communicate(timeout=600)
    assert ray.returncode == 0, ray_err
    local = cli(*common, "--output", "local.jsonl", "--store", "ray.sqlite", cwd=tmp_path)
    _, local_err = local.communicate(timeout=600)
    assert local.returncode == 0, local_err
    assert "6 from the store" in local_err, local_err  # 7 records: 1 near-duplicate, the rest from Ray's store
    records = read_records(tmp_path / "ray.jsonl")
    assert records == read_records(tmp_path / "local.jsonl")
    assert [r["index"] for r in records] == list(range(7))
    assert records[0]["prompt"] == "Hello there" and records[5]["duplicate_of"] == 4
    assert stored(tmp_path / "ray.sqlite") == 6


@pytest.mark.slow
def test_replaced_weights_are_another_model_a_rerun_generates_everything_again(tmp_path):
    """Weights copied over the folder (same size, mtime) are another model: the store's keys hold the files'
    content, so a rerun reuses nothing of the first model's; the same weights again reuse everything."""
    model = build_tiny_checkpoint(tmp_path / "model", "llama", seed=1)
    other = build_tiny_checkpoint(tmp_path / "ckB", "llama", seed=2)
    source = write_prompts(tmp_path / "in.jsonl", 6)
    output = tmp_path / "out.jsonl"
    first = generate_dataset(str(source), str(model), str(output), **GREEDY, **QUIET)
    assert (first.generated, first.already_done, first.errors) == (6, 0, 0)
    answers = [r["answer"] for r in read_records(output)]

    stamp = os.stat(model / "model.safetensors")
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    replaced = generate_dataset(str(source), str(model), str(output), **GREEDY, **QUIET)
    assert (replaced.generated, replaced.already_done) == (6, 0)

    build_tiny_checkpoint(model, "llama", seed=1)  # the first weights again (same bytes): the same identity
    again = generate_dataset(str(source), str(model), str(output), **GREEDY, **QUIET)
    assert (again.generated, again.already_done) == (0, 6)
    assert [r["answer"] for r in read_records(output)] == answers


@pytest.mark.slow
def test_ray_only_input_folder_with_store_limit_and_near_dedup(llama_path, tmp_path):
    """A folder only Ray reads: records numbered across its files in order; --store, --limit, --near-dedup."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_prompts(folder / "a.jsonl", 3)
    (folder / "b.jsonl").write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"Second file {i}: a lazy dog"})
                                            + "\n" for i in range(3)) + json.dumps({"id": "no-prompt"}) + "\n")
    run = cli("run", llama_path, "--input", str(folder), "--output", "out.jsonl", "--ray", "--store", "s.sqlite",
              "--limit", "6", "--near-dedup", "0.9", "--temperature", "0", "--max-new-tokens", "4",
              "--no-emissions", "--quiet", cwd=tmp_path)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    records = read_records(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "b0", "b1", "b2"]  # --limit 6: not the 7th row
    assert all(r["error"] is None and r["answer"] for r in records)
    assert stored(tmp_path / "s.sqlite") == 6


AFTER_EXIT = textwrap.dedent("""
    import atexit, sys, time
    from simple_generation.cli import main
    # the last hook to run at exit: it says it has started, then takes its time
    atexit.register(lambda: (print("EXITING", file=sys.stderr, flush=True), time.sleep(60)))
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_cli_ray_lists_failed_records_in_one_line_each_and_a_late_ctrl_c_exits_130(llama_path, tmp_path):
    """A record that fails (too long) is one line, as on the local path; a Ctrl-C while the process exits ends it
    with 130 and no traceback."""
    source = write_prompts(tmp_path / "in.jsonl", 4, r1="word " * 400)  # beyond the model's 256 tokens
    driver = subprocess.Popen([sys.executable, "-c", AFTER_EXIT, "run", llama_path, "--input", str(source),
                               "--output", "out.jsonl", "--ray", "--temperature", "0", "--max-new-tokens", "4"],
                              cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in driver.stderr:
        lines.append(line)
        if line.startswith("EXITING"):
            driver.send_signal(signal.SIGINT)
            break
    lines += driver.stderr.readlines()
    driver.wait(timeout=60)
    err = "".join(lines)
    assert driver.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    failed = [line for line in lines if line.startswith("  record ")]
    assert any(line.startswith("simple-generation: 1 prompt(s) failed (their records carry the error")
               for line in lines)
    assert len(failed) == 1 and failed[0].startswith("  record 1 (") and "context" in failed[0], failed
    records = read_records(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["error"] is not None for r in records] == [False, True, False, False]


@pytest.mark.slow
def test_no_ray_process_outlives_a_driver_killed_with_sigkill(llama_path, tmp_path):
    """The local Ray the CLI started goes away with its driver, agents included."""
    source = write_prompts(tmp_path / "in.jsonl", 3000)
    driver = cli("run", llama_path, "--input", str(source), "--output", "out.jsonl", "--ray", "--temperature", "0",
                 "--max-new-tokens", "8", "--quiet", "--batch-size", "8", cwd=tmp_path)
    deadline = time.time() + 300
    while driver.poll() is None and stored(tmp_path / "out.jsonl.sqlite") == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[1]
    family = psutil.Process(driver.pid).children(recursive=True)
    names = " ".join(p.name() for p in family)
    assert "raylet" in names and "gcs_server" in names
    driver.kill()
    driver.communicate()
    gone, alive = psutil.wait_procs(family, timeout=30)
    leftovers = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for proc in leftovers:  # never leave them to the next test
        proc.kill()
    assert not leftovers, [(p.pid, p.name()) for p in leftovers]


@pytest.mark.slow
def test_a_replica_error_is_the_local_runs_error(llama_path, tmp_path):
    """With on_error="raise", the job fails with the error a local run raises (its prompt numbers those of the
    call), not Ray's wrapping of it."""
    source = write_prompts(tmp_path / "in.jsonl", 3, r1="word " * 400)
    with pytest.raises(ValueError) as caught:
        generate_dataset(str(source), llama_path, str(tmp_path / "out.jsonl"), on_error="raise", **GREEDY, **QUIET)
    message = str(caught.value)
    assert message.startswith("1 prompt(s) leave no room in the model's context of 256 tokens (prompt 1 has ")
    assert "ray" not in message.lower()
