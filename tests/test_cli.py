"""The command-line tool: usage errors before anything loads, files in and out, resume from the store."""

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from simple_generation import SimpleGenerator
from simple_generation.cli import _generator_kwargs, build_parser, main

from .conftest import PROMPTS

CLI = [sys.executable, "-m", "simple_generation.cli"]
FAST = ["--max-new-tokens", "4", "--temperature", "0", "--skip-prompt", "--quiet", "--no-emissions"]


def _code(argv):
    """main()'s exit code (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def test_cli_jsonl_in_order_equal_to_library(llama_path, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(CLI + [llama_path, "--input", str(source), "--output", str(out), "--max-new-tokens", "6",
                          "--temperature", "0", "--skip-prompt", "--batch-size", "4", "--quiet", "--no-emissions"],
                   check=True, env=env, timeout=300, cwd=tmp_path)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = SimpleGenerator(llama_path, device="cpu", track_emissions=False)(
        PROMPTS[:6], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert [r["index"] for r in records] == list(range(6))
    assert [r["prompt"] for r in records] == PROMPTS[:6]
    assert [r["answer"] for r in records] == expected


def test_cli_without_prompts_fails_clearly(llama_path):
    result = subprocess.run(CLI + [llama_path], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "No prompts" in result.stderr


# ------------------------------------------------------------------------------------------- before loading
@pytest.fixture
def files(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": nope}\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}", encoding="utf-8")
    return tmp_path


MODEL = "nobody/not-a-model"  # offline: loading it would fail with exit code 1, so exit code 2 means "before"


@pytest.mark.parametrize("argv, message", [
    ([MODEL, "--prompt", "x", "--batch-size", "abc"], "--batch-size"),
    ([MODEL, "--prompt", "x", "--batch-size", "0"], "--batch-size"),
    ([MODEL, "--prompt", "x", "--temperature", "-1"], "--temperature"),
    ([MODEL, "--prompt", "x", "--top-p", "0"], "--top-p"),
    ([MODEL, "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    ([MODEL, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    ([MODEL, "--prompt", "x", "--top-k", "-2"], "--top-k"),
    ([MODEL, "--prompt", "x", "-n", "0"], "--num-return-sequences"),
    ([MODEL, "--prompt", "x", "--dtype", "float8x"], "--dtype"),
    ([MODEL, "--prompt", "x", "--limit", "-1"], "--limit"),
    ([MODEL, "--prompt", "x", "--near-dedup", "1.5"], "--near-dedup"),
    ([MODEL, "--prompt", "x", "--fast-engine-after", "-1"], "--fast-engine-after"),
    ([MODEL, "--prompt", "x", "--generation", "no_equals"], "KEY=VALUE"),
    ([MODEL, "--prompt", "x", "--generation", "temperature=-1"], "temperature"),
    ([MODEL, "--prompt", "x", "--replicas", "2"], "--replicas needs --ray"),
    ([MODEL, "--input", "{d}/folder", "--ray"], "--ray with a folder or URI --input needs --output"),
    ([MODEL, "--input", "{d}/folder", "--output", "{d}/o.jsonl", "--ray", "--dry-run"], "does not support --dry-run"),
    ([MODEL, "--prompt", "x", "--output-format", "parquet"], "parquet output needs --output"),
    ([MODEL], "No prompts"),
    ([MODEL, "--input", "{d}/missing.jsonl"], "no such file"),
    ([MODEL, "--input", "{d}/p.txt", "--output", "{d}/p.txt"], "is the input file"),
    ([MODEL, "--input", "{d}/p.txt", "--output", "{d}/nodir/out.jsonl"], "does not exist"),
    ([MODEL, "--input", "{d}/p.txt", "--output", "{d}/folder"], "is a directory"),
    ([MODEL, "--input", "{d}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["{d}/folder", "--prompt", "x", "--gguf-file", "model.Q4.gguf"], "--gguf-file model.Q4.gguf is not in"),
    (["{d}/missing-model", "--prompt", "x"], "does not exist"),
    (["chat", "{d}/missing-model"], "does not exist"),
])
def test_usage_errors_exit_2_with_one_line_before_loading(files, capsys, argv, message):
    argv = [a.replace("{d}", str(files)) for a in argv]
    assert _code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _code([MODEL, "--prompt", "x", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_model_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _code([MODEL, "--prompt", "x", "--quiet", "--no-emissions"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("simple-generation: error:") and "Traceback" not in err and "--debug" in err


def test_dtype_auto_and_options_reach_the_generator():
    args = build_parser().parse_args(["run", "m", "--prompt", "x", "--dtype", "auto", "--revision", "v2",
                                      "--trust-remote-code", "--tokenizer", "tok", "--dtype", "bf16"])
    kwargs = _generator_kwargs(args, torch_dtype=False)
    assert kwargs["dtype"] == "bfloat16" and kwargs["revision"] == "v2" and kwargs["trust_remote_code"] is True
    assert kwargs["tokenizer_name_or_path"] == "tok"
    args = build_parser().parse_args(["run", "m", "--prompt", "x", "--dtype", "auto"])
    assert _generator_kwargs(args)["dtype"] == "auto"


def test_help_shows_defaults_and_version(capsys):
    assert _code(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: auto)" in out and "(default: record)" in out and "--generation KEY=VALUE" in out
    assert _code(["--version"]) == 0
    assert capsys.readouterr().out.startswith("simple-generation ")


def test_help_and_usage_errors_do_not_import_torch():
    eager = subprocess.run([sys.executable, "-c", "import sys, simple_generation; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert eager.stdout.strip() == "False", "import simple_generation imports torch eagerly:\n" + eager.stderr
    code = ("import sys\nfrom simple_generation.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['m', '--prompt', 'x', '--batch-size', 'abc']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_tiny_prints_its_path_on_stderr(tmp_path, capsys):
    from simple_generation.tiny import main as tiny_main

    tiny_main([str(tmp_path / "t"), "--hidden", "16", "--layers", "1", "--heads", "2"])
    captured = capsys.readouterr()
    assert captured.out == "" and str(tmp_path / "t") in captured.err


def test_examples_prompts_jsonl_is_valid():
    from simple_generation.io import scan

    report = scan(Path(__file__).parent.parent / "examples" / "prompts.jsonl")
    assert report.ok and report.records >= 5


# ------------------------------------------------------------------------------------------- runs (one load each)
def test_run_jsonl_params_fields_and_n(llama_path, tmp_path):
    rows = [{"prompt": "Hello", "id": "a"}, {"prompt": "What is 2 + 2?", "id": "b", "max_new_tokens": 2},
            {"prompt": "Once upon a time", "id": "c", "n": 2, "temperature": 0.8, "do_sample": True,
             "answer": "gold"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([llama_path, "--input", str(source), "--output", str(out), "--max-new-tokens", "6",
                 "--temperature", "0", "--skip-prompt", "--quiet", "--no-emissions"]) == 0
    records = _jsonl(out)
    assert [r["id"] for r in records] == ["a", "b", "c"] and [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == ["Hello", "What is 2 + 2?", "Once upon a time"]
    # the record's own max_new_tokens caps its answer, and only its answer (the tiny model never stops early)
    assert (records[1]["completion_tokens"], records[1]["finish_reason"]) == (2, "length")
    assert (records[0]["completion_tokens"], records[0]["finish_reason"]) == (6, "length")
    assert isinstance(records[2]["answer"], list) and len(records[2]["answer"]) == 2
    assert records[2]["input_answer"] == "gold"
    assert all(r["error"] is None and r["finish_reason"] for r in records)
    assert Path(f"{out}.sqlite").exists()  # the default store, next to the output


def test_run_openai_batch_round_trip(llama_path, tmp_path):
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 3}}
             for i, p in enumerate(["Hi", "Tell me what is two plus two?", "Hi"])]
    lines.append({"custom_id": "req-text", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3}})
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "results.jsonl"
    assert main([llama_path, "--input", str(source), "--output", str(out), "--output-format", "openai-batch",
                 "--system-prompt", "vicuna_v1.1", *FAST]) == 0
    results = _jsonl(out)
    assert [r["custom_id"] for r in results] == ["req-0", "req-1", "req-2", "req-text"]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    bodies = [r["response"]["body"] for r in results]
    assert [b["object"] for b in bodies] == ["chat.completion"] * 3 + ["text_completion"]
    assert bodies[0]["choices"][0]["message"]["role"] == "assistant"
    assert bodies[0]["choices"][0]["message"]["content"] == bodies[2]["choices"][0]["message"]["content"]
    assert all(b["usage"]["completion_tokens"] <= 3 and b["model"] == "tiny" for b in bodies)
    assert all(c["finish_reason"] in ("stop", "length") for b in bodies for c in b["choices"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_run_csv_and_parquet_output(llama_path, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    source = tmp_path / "in.csv"
    source.write_text("id,prompt\n1,Hello\n2,\"two\nlines\"\n", encoding="utf-8")
    out = tmp_path / f"out{suffix}"
    assert main([llama_path, "--input", str(source), "--output", str(out), "--no-store", *FAST]) == 0
    if suffix == ".csv":
        import csv

        rows = list(csv.DictReader(open(out, encoding="utf-8", newline="")))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["prompt"]) for r in rows] == [("1", "Hello"), ("2", "two\nlines")]
    assert all(r["answer"] for r in rows)
    assert not Path(f"{out}.sqlite").exists()


def test_run_stdin_near_dedup_and_dry_run(llama_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasketch")
    text = "the quick brown fox jumps over the lazy dog again and again\n" \
           "the quick brown fox jumps over the lazy dog again and again!\n" \
           "something else entirely\n"
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(text.encode())))
    assert main([llama_path, "--input", "-", "--dry-run", "--near-dedup", "0.8"]) == 0
    report = capsys.readouterr().out
    assert "3 records" in report and "near-duplicates at 0.8: 1" in report and "prompt tokens" in report
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(text.encode())))
    assert main([llama_path, "--input", "-", "--near-dedup", "0.8", *FAST]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[1]["duplicate_of"] == 0 and records[1]["answer"] is None
    assert "duplicate_of" not in records[0] and records[0]["answer"] is not None


def test_run_records_a_failing_prompt_and_exits_3(llama_path, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    rows = [{"prompt": "Hello"}, {"prompt": "word " * 400}, {"prompt": "Once upon a time"}]  # context: 256
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([llama_path, "--input", str(source), "--output", str(out), *FAST]) == 3
    records = _jsonl(out)
    assert [r["error"] is None for r in records] == [True, False, True]
    assert records[1]["answer"] is None and records[0]["answer"] is not None
    err = capsys.readouterr().err
    assert "1 prompt(s) failed" in err and f"record 1 ({source}:2)" in err


@pytest.mark.slow
def test_rerun_rewrites_the_output_from_the_store(llama_path, tmp_path, caplog):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(PROMPTS[:8]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = [llama_path, "--input", str(source), "--output", str(out), "--window-size", "3",
            *[a for a in FAST if a != "--quiet"]]
    assert main(argv) == 0
    first = out.read_text(encoding="utf-8")
    out.write_text(first.split("\n", 2)[0] + "\n", encoding="utf-8")  # as if killed after one record
    caplog.set_level("INFO", logger="simple_generation")
    assert main(argv) == 0
    assert out.read_text(encoding="utf-8") == first
    assert "8 from the store" in caplog.text


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(llama_path, tmp_path):
    import re
    import signal
    import time

    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(60)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    options = ["--max-new-tokens", "8", "--temperature", "0", "--skip-prompt", "--no-emissions", "--batch-size", "2",
               "--window-size", "10"]
    reference = tmp_path / "reference.jsonl"
    assert main([llama_path, "--input", str(source), "--output", str(reference), "--no-store", "--quiet",
                 *options]) == 0
    out = tmp_path / "out.jsonl"
    argv = CLI + ["run", llama_path, "--input", str(source), "--output", str(out), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = _jsonl(out)
    assert out.read_bytes().endswith(b"\n") and [r["index"] for r in written] == list(range(len(written)))
    assert 5 <= len(written) < 60
    rerun = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
    cached = int(re.search(r"(\d+) from the store", rerun.stderr).group(1))
    assert cached >= len(written)  # what was written before the kill was not generated again


@pytest.mark.slow  # (and tests/test_readme.py runs the whole line, tiny build included, twice)
def test_readme_main_job_command_runs(llama_path, tmp_path):
    """The README's first command (after set-up) runs as written, on a tiny model, and a rerun resumes."""
    import shlex

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("bash scripts/setup.sh && python -m "
                                                                       "simple_generation.tiny"))
    command = shlex.split(line.split("&& simple-generation ", 1)[1])
    command = [llama_path if arg == "/tmp/tiny-llama" else str(tmp_path / "answers.jsonl")
               if arg == "/tmp/answers.jsonl" else arg for arg in command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).parent.parent
    for _ in range(2):
        result = subprocess.run(CLI + command + ["--no-emissions"], env=env, cwd=root, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
        assert len(records) == 6 and all(r["error"] is None for r in records)
    assert "6 from the store" in result.stderr
