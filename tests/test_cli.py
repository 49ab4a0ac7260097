"""The command-line tool, run as a real process."""

import json
import os
import subprocess
import sys

from simple_generation import SimpleGenerator

from .conftest import PROMPTS

CLI = [sys.executable, "-m", "simple_generation.cli"]


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
