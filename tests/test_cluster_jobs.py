"""Ray jobs never certify foreign or stale output, report bad records like the local CLI, and leave no Ray
processes behind (issue 20, items 1, 2, 13 and 22). Real files, real tiny checkpoints, a real local Ray
started by the job itself, and the real CLI in subprocesses (SIGKILL, SIGINT)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.data")
import psutil  # noqa: E402 - installed with accelerate

from simple_generation.cluster import MANIFEST, generate_dataset  # noqa: E402
from simple_generation.tiny import build_tiny_checkpoint  # noqa: E402

GREEDY = dict(temperature=0, max_new_tokens=4, skip_prompt=True)
QUIET = dict(model_kwargs={"track_emissions": False}, show_progress=False)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")


def write_prompts(path: Path, n: int, **replace) -> Path:
    rows = [{"id": f"r{i}", "prompt": f"Record {i}: the quick brown fox"} for i in range(n)]
    for index, value in replace.items():
        rows[int(index.lstrip("r"))]["prompt"] = value
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def job_file(output: Path) -> Path:
    return output.with_name(f".{output.name}{MANIFEST}")


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simple_generation.cli", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLE_GENERATION_CACHE", str(tmp_path / "hash-cache"))


# ---------------------------------------------------------------------------------------------- refusals (no Ray)
def test_existing_output_without_a_job_file_is_never_counted_as_done(llama_path, tmp_path):
    """Item 1: another job's output (lines with ``index``, no job file) is refused, untouched, nothing written."""
    source = write_prompts(tmp_path / "in.jsonl", 20)
    output = tmp_path / "R1.jsonl"
    foreign = "".join(json.dumps({"id": f"r{i}", "index": i, "answer": "ckA's greedy answer", "error": None}) + "\n"
                      for i in range(20))
    output.write_text(foreign)
    for content in (foreign, "not json at all\n"):  # item 13: a non-JSON output, the same clear refusal
        output.write_text(content)
        with pytest.raises(ValueError, match="no job file"):
            generate_dataset(str(source), llama_path, str(output), ordered=True, temperature=0.9, seed=3, **QUIET)
        assert output.read_text() == content
        assert not job_file(output).exists() and not (tmp_path / "R1.jsonl.parts").exists()


def test_cli_ray_refuses_foreign_output_and_reports_invalid_records_like_the_local_path(llama_path, tmp_path):
    """Items 1 and 13 from the command line: one line each, before Ray starts; nothing left behind."""
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]

    good = write_prompts(tmp_path / "good.jsonl", 5)
    (tmp_path / "R1.jsonl").write_text("".join(json.dumps({"index": i, "answer": "x"}) + "\n" for i in range(5)))
    refused = cli("run", llama_path, "--input", str(good), "--output", "R1.jsonl", "--ray", "--temperature", "0.9",
                  "--seed", "3", cwd=tmp_path)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "no job file" in err, err
    assert not job_file(tmp_path / "R1.jsonl").exists() and not (tmp_path / "R1.jsonl.parts").exists()


# ---------------------------------------------------------------------------------------------- real Ray jobs
@pytest.mark.slow
def test_finished_job_refuses_replaced_weights_and_a_replaced_output(tmp_path):
    """Item 2: weights copied over the folder (same size, mtime) are another model: a rerun is refused
    (before Ray starts) and the finished output stays as it is; so is a rerun over an output changed since."""
    model = build_tiny_checkpoint(tmp_path / "model", "llama", seed=1)
    other = build_tiny_checkpoint(tmp_path / "ckB", "llama", seed=2)
    source = write_prompts(tmp_path / "in.jsonl", 6)
    output = tmp_path / "out.jsonl"
    summary = generate_dataset(str(source), str(model), str(output), ordered=True, **GREEDY, **QUIET)
    assert (summary.generated, summary.errors) == (6, 0)
    finished = output.read_bytes()
    job = json.loads(job_file(output).read_text())
    assert job["model_files"]["files"] and job["input_files"]

    again = generate_dataset(str(source), str(model), str(output), ordered=True, **GREEDY, **QUIET)
    assert (again.already_done, again.generated) == (6, 0)

    stamp = os.stat(model / "model.safetensors")
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(ValueError, match="changed: model_files"):
        generate_dataset(str(source), str(model), str(output), ordered=True, **GREEDY, **QUIET)
    assert output.read_bytes() == finished and json.loads(job_file(output).read_text()) == job

    build_tiny_checkpoint(model, "llama", seed=1)  # the job's weights again (same bytes): the same identity
    output.write_text(output.read_text().replace('"answer": "', '"answer": "forged '))
    with pytest.raises(ValueError, match="not the file this job wrote"):
        generate_dataset(str(source), str(model), str(output), ordered=True, **GREEDY, **QUIET)
    output.write_text("not json\n")
    with pytest.raises(ValueError, match="not the file this job wrote"):
        generate_dataset(str(source), str(model), str(output), ordered=True, **GREEDY, **QUIET)
    assert output.read_text() == "not json\n" and not (tmp_path / "out.jsonl.parts").exists()


AFTER_EXIT = textwrap.dedent("""
    import atexit, sys, time
    from simple_generation.cli import main
    # the last hook to run at exit: it says it has started, then takes its time
    atexit.register(lambda: (print("EXITING", file=sys.stderr, flush=True), time.sleep(60)))
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_cli_ray_lists_failed_records_in_one_line_each_and_a_late_ctrl_c_exits_130(llama_path, tmp_path):
    """Item 13: a record that fails (too long) is one line, as on the local path; item 22: a Ctrl-C while the
    process exits ends it with 130 and no traceback."""
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
    assert "simple-generation: 1 prompt(s) failed (their records carry the error):\n" in lines
    assert len(failed) == 1 and failed[0].startswith("  record 1 (") and "context" in failed[0], failed
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["error"] is not None for r in records] == [False, True, False, False]


@pytest.mark.slow
def test_no_ray_process_outlives_a_driver_killed_with_sigkill(llama_path, tmp_path):
    """Item 22: the local Ray the CLI started goes away with its driver, agents included."""
    source = write_prompts(tmp_path / "in.jsonl", 3000)
    driver = cli("run", llama_path, "--input", str(source), "--output", "out.jsonl", "--ray", "--temperature", "0",
                 "--max-new-tokens", "8", "--quiet", "--batch-size", "8", cwd=tmp_path)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.time() + 300
    while driver.poll() is None and not list(parts.glob("part-*")) and time.time() < deadline:
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
def test_a_replica_error_is_one_line_naming_the_replicas_own_error(llama_path, tmp_path):
    """Item 13: with on_error="raise", the job fails with the replica's error, not Ray's wrapping."""
    source = write_prompts(tmp_path / "in.jsonl", 3, r1="word " * 400)
    with pytest.raises(RuntimeError) as caught:
        generate_dataset(str(source), llama_path, str(tmp_path / "out.jsonl"), ordered=True, on_error="raise",
                         **GREEDY, **QUIET)
    message = str(caught.value)
    assert message.startswith("the Ray job failed: ValueError: 1 prompt(s) leave no room in the model's context")
    assert "\n" not in message and "ray::" not in message
