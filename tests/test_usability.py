"""What a new user meets first: call-level `n`, the tiny checkpoint builder, the package version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from simple_generation import SimpleGenerator
from simple_generation.tiny import build_tiny_checkpoint, holds_checkpoint
from simple_generation.tiny import main as tiny_main

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ n at the call level
@pytest.fixture(scope="module")
def generator(llama_path):
    return SimpleGenerator(llama_path, device="cpu", track_emissions=False)


def test_n_works_for_the_call_as_for_one_prompt(generator, tmp_path):
    prompts = ["Hello", "Tell me what is two plus two?"]
    kwargs = dict(max_new_tokens=4, seed=7, show_progress_bar=False)
    answers = generator(prompts, n=2, **kwargs)
    assert [len(a) for a in answers] == [2, 2] and all(isinstance(t, str) for a in answers for t in a)
    assert generator(prompts, num_return_sequences=2, **kwargs) == answers
    results = generator.generate(prompts, n=2, store=str(tmp_path / "s.sqlite"), **kwargs)
    assert [r.texts for r in results] == answers
    # the per-prompt spelling is the same request: same answers, and the store serves them
    per_prompt = generator.generate(prompts, params=[{"n": 2}, {"num_return_sequences": 2}],
                                    store=str(tmp_path / "s.sqlite"), **kwargs)
    assert [r.texts for r in per_prompt] == answers and all(r.cached for r in per_prompt)
    streamed = sorted(generator.stream(prompts, n=2, **kwargs), key=lambda r: r.index)
    assert [r.texts for r in streamed] == answers


def test_call_level_aliases_and_conflicts(generator):
    kwargs = dict(temperature=0, show_progress_bar=False)
    assert generator(["Hello"], max_tokens=3, **kwargs) == generator(["Hello"], max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        generator(["Hello"], n=2, num_return_sequences=2, max_new_tokens=2, seed=1, show_progress_bar=False)
    with pytest.raises(ValueError, match="not both"):
        generator(["Hello"], max_tokens=2, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generator(["Hello"], n=0, max_new_tokens=2, seed=1, show_progress_bar=False)


# ------------------------------------------------------------------------------------ the tiny builder
def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_tiny_build_is_byte_identical_for_a_seed(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", "llama", seed=1)
    b = build_tiny_checkpoint(tmp_path / "b", "llama", seed=1)
    c = build_tiny_checkpoint(tmp_path / "c", "llama", seed=2)
    assert _files(a) == _files(b)
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]
    assert holds_checkpoint(a) and not holds_checkpoint(tmp_path / "missing")
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]  # no staging folder left behind


def test_tiny_cli_keeps_an_existing_checkpoint_and_force_rebuilds(tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_main([str(path)])
    assert "built" in capsys.readouterr().err
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    tiny_main([str(path)])
    assert "exists, kept" in capsys.readouterr().err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before
    for other in (["--arch", "gpt2"], ["--hidden", "32"], ["--context", "512"]):  # not what is there: refused
        with pytest.raises(SystemExit) as stop:
            tiny_main([str(path), *other])
        assert stop.value.code == 2 and "--force" in capsys.readouterr().err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before
    tiny_main([str(path), "--force"])
    assert "built" in capsys.readouterr().err
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}  # same bytes
    assert after["model.safetensors"][0] != before["model.safetensors"][0]              # rewritten


def test_tiny_cli_builds_over_an_unfinished_folder(tmp_path, capsys):
    """A folder without a finished checkpoint (a build killed half-way, an empty folder) is built."""
    path = tmp_path / "half"
    path.mkdir()
    (path / "tokenizer.json").write_text("{}")
    tiny_main([str(path), "--arch", "gpt2", "--seed", "3"])
    assert "built" in capsys.readouterr().err
    assert holds_checkpoint(path)
    assert _files(path) == _files(build_tiny_checkpoint(tmp_path / "ref", "gpt2", seed=3))


# ------------------------------------------------------------------------------------ version
def test_version_is_the_packages_and_above_the_original():
    import simple_generation

    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert simple_generation.__version__ == declared
    assert tuple(int(x) for x in declared.split(".")[:3]) >= (1, 0, 0)  # above the original project's 0.6.3
    script = Path(sys.executable).parent / "simple-generation"  # the installed console script, else the module
    command = [str(script)] if script.exists() else [sys.executable, "-m", "simple_generation.cli"]
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"simple-generation {declared}"
    from importlib import metadata

    try:
        installed = metadata.version("simple-generation")
    except metadata.PackageNotFoundError:
        return
    assert installed == declared, "the installed metadata is stale: pip install -e . again"


def test_readme_installs_from_a_clone():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[' in install
    assert not re.search(r'^pip install "simple-generation', install, re.M)  # PyPI has the original project


@pytest.mark.slow
def test_a_forced_rebuild_keeps_the_models_identity(tmp_path):
    """Byte-identical rebuilds are the same model to the store (its identity hashes file contents): a job
    rerun after `--force` resumes instead of generating again."""
    path, output = tmp_path / "tiny", tmp_path / "out.jsonl"
    run = [sys.executable, "-m", "simple_generation.cli", "run", str(path), "--input",
           str(REPO / "examples" / "prompts.jsonl"), "--output", str(output), "--max-new-tokens", "8",
           "--temperature", "0", "--no-emissions"]
    build = [sys.executable, "-m", "simple_generation.tiny", str(path)]
    summaries = []
    for extra in ([], ["--force"]):
        assert subprocess.run(build + extra, capture_output=True, text=True, timeout=300).returncode == 0
        done = subprocess.run(run, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries.append(done.stdout + done.stderr)
    assert re.search(r"\b0 from the store", summaries[0])
    assert re.search(r"\b6 from the store", summaries[1]) and re.search(r"\b0 generated tokens", summaries[1])
