"""The README's code blocks run as pasted, against tiny local checkpoints (nothing is downloaded).

Every fenced block of README.md is classified here, and a new block that matches no rule fails
``test_every_block_is_classified``: it must be run (below) or put on the skip list with its reason.

- ``python`` blocks run one by one, each in a fresh namespace (as pasted into a new interpreter), in order,
  in one working folder shared by the module (so the block that reads ``run.sqlite`` finds the store the
  block before it wrote; such dependencies are declared in ``DEPENDS`` and run first when needed).
- Hub ids are replaced by tiny checkpoints of the same family built by ``simple_generation.tiny`` (see
  ``HUB_IDS``); ``/tmp/tiny-llama`` by the session's tiny Llama (same options and seed, so identical
  files); ``MODEL`` in shell commands by it too.
- ``bash`` blocks meant to run offline run line by line in a subprocess, in the working folder (where
  ``examples/`` is linked, and the inputs the Big-jobs commands name are written); they launch real
  processes, so they are marked slow. Lines that need the network, CUDA, Ray, a browser or never end
  (the web app) are on ``SKIP_LINES``; whole blocks on ``SKIP_BLOCKS``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
REPO = README.parent

# Chat template for the stand-in of a hub model that ships one (Llama-3-Instruct).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# hub id -> which tiny stand-in
HUB_IDS = {
    "meta-llama/Llama-2-7b-chat-hf": "llama",
    "lmsys/vicuna-7b-v1.5": "llama",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-chat",
    "google/flan-t5-large": "t5",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "reasoning",  # a Qwen3 with <think> markers (test_reasoning)
    "llava-hf/llava-1.5-7b-hf": "llava",  # a tiny LLaVA with its real processor (tests/vlm_models.py)
}

# Whole blocks not run, found by a distinctive piece of their text: (piece, why).
SKIP_BLOCKS = [
    ("bash scripts/setup.sh && python -m simple_generation.tiny",
     "the two commands: the main job's line runs in test_main_command_line_reruns_and_resumes (without "
     "setup.sh, which installs packages); the test line is the test suite itself"),
    ("pip install torch", "installs packages from the network"),
    ("simple-generation chat MODEL", "installs gradio from the network and serves forever (tests/test_app.py)"),
    ("--ray --replicas 2", "Ray cluster runs (tests/test_cluster.py)"),
    ("from simple_generation.cluster import generate_dataset", "Ray cluster runs (tests/test_cluster.py)"),
    ("benchmarks/shapes.py", "benchmarks: minutes to hours, and the fast engines' venvs"),
    ("bash .ci/run", "runs the test suite itself"),
]
# Single lines of run blocks that are not run: (piece, why).
SKIP_LINES = [
    ("simple-generation chat ", "starts the web app, which serves until stopped (tests/test_app.py)"),
]
# Python blocks checked another way than by running them: (piece, test that checks it).
CHECKED_OTHERWISE = [
    ("class DefaultGenerationConfig", "test_default_generation_config_block_is_the_real_one"),
    ("entry points   cli.py", "test_architecture_names_real_modules"),
]
# A block that needs the files an earlier block wrote: (piece of the block, piece of the block it needs).
DEPENDS = [
    ('pd.read_sql("SELECT prompt', 'store="run.sqlite"'),
]


@dataclasses.dataclass
class Block:
    language: str
    code: str
    line: int
    section: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{self.language}-L{self.line}-{slug}"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks, section, in_block = [], "top", None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if in_block is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            match = re.match(r"^(\s*)```(\w*)\s*$", line)
            if match:
                in_block = (match.group(1), match.group(2), number, [])
            continue
        indent, language, start, body = in_block
        if line.strip() == "```":
            code = "\n".join(b[len(indent):] if b.startswith(indent) else b for b in body)
            blocks.append(Block(language, code, start, section))
            in_block = None
        else:
            body.append(line)
    assert in_block is None, f"README.md: a code block opened at line {in_block[2]} is never closed"
    return blocks


BLOCKS = readme_blocks()


def _find(rules, block: Block):
    return next(((piece, why) for piece, why in rules if piece in block.code), None)


def runnable(language: str) -> list[Block]:
    return [b for b in BLOCKS if b.language == language and _find(SKIP_BLOCKS, b) is None
            and _find(CHECKED_OTHERWISE, b) is None]


def test_every_block_is_classified():
    """Each block is a runnable python/bash block, or on an explicit list with its reason."""
    for block in BLOCKS:
        ruled = _find(SKIP_BLOCKS, block) or _find(CHECKED_OTHERWISE, block)
        assert block.language in ("python", "bash") or ruled, \
            f"README.md:{block.line}: a ```{block.language or '(none)'} block: classify it in tests/test_readme.py"
    for piece, _ in SKIP_BLOCKS + CHECKED_OTHERWISE:
        assert any(piece in b.code for b in BLOCKS), f"stale rule in tests/test_readme.py: {piece!r} is in no block"
    assert len(runnable("python")) >= 8


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def stand_ins(tiny_checkpoints, tmp_path_factory):
    from transformers import AutoTokenizer

    chat = tmp_path_factory.mktemp("readme-chat") / "llama-chat"
    shutil.copytree(tiny_checkpoints["llama"], chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat)
    from .test_reasoning import build_reasoning_checkpoint

    reasoning = build_reasoning_checkpoint(tiny_checkpoints["llama"], tmp_path_factory.mktemp("readme-reasoning"),
                                           special=False)
    from .vlm_models import build_vlm

    llava = build_vlm("llava", tmp_path_factory.mktemp("readme-llava") / "llava")
    return {**tiny_checkpoints, "llama-chat": str(chat), "reasoning": reasoning, "llava": llava}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The folder the README's snippets run in (as the clone's root would be): examples/ and the inputs the
    Big-jobs commands name."""
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").symlink_to(REPO / "examples")
    prompts = [json.loads(line) for line in (REPO / "examples" / "prompts.jsonl").read_text().splitlines() if line]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "batch_requests.jsonl").write_text("".join(
        json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": p["prompt"]}],
                             "max_tokens": 8}}) + "\n" for i, p in enumerate(prompts)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [p["prompt"] for p in prompts]}), root / "data.parquet")
    return root


def substitute(code: str, stand_ins: dict[str, str], workspace: Path) -> str:
    for hub_id, arch in HUB_IDS.items():
        code = code.replace(hub_id, stand_ins[arch])
    code = code.replace("/tmp/tiny-llama", stand_ins["llama"]).replace("/tmp/answers.jsonl",
                                                                         str(workspace / "answers.jsonl"))
    return re.sub(r"\bMODEL\b", stand_ins["llama"], code)


_done: set[int] = set()


def run_python_block(block: Block, stand_ins, workspace, monkeypatch):
    for piece, needed in DEPENDS:
        if piece in block.code:
            earlier = next(b for b in BLOCKS if needed in b.code and b.line < block.line)
            if earlier.line not in _done:
                run_python_block(earlier, stand_ins, workspace, monkeypatch)
    monkeypatch.chdir(workspace)
    code = substitute(block.code, stand_ins, workspace)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{block.line}", "exec"), namespace)  # noqa: S102 - the README's own code
    _done.add(block.line)
    return namespace


# ------------------------------------------------------------------------------------------------ python
@pytest.mark.parametrize("block", runnable("python"), ids=lambda b: b.id)
def test_python_block_runs_as_pasted(block, stand_ins, workspace, monkeypatch):
    namespace = run_python_block(block, stand_ins, workspace, monkeypatch)
    if "conversation_from_user_prompts" in block.code:
        # multi-turn on a 256-token context with the default 512 new tokens: every turn got its answer
        for conversation in namespace["conversations"]:
            assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
    if "results = gen.generate(" in block.code:
        assert len(namespace["results"]) == len(namespace["prompts"])
        assert [len(r.texts) for r in namespace["results"]][2] == 3 or namespace["results"][2].duplicate_of


def test_default_generation_config_block_is_the_real_one():
    """The Defaults section shows DefaultGenerationConfig's fields and defaults as they are."""
    from simple_generation import DefaultGenerationConfig

    block = next(b for b in BLOCKS if "class DefaultGenerationConfig" in b.code)
    namespace: dict = {}
    exec("import dataclasses\n" + block.code, namespace)  # noqa: S102
    shown = {f.name: f.default for f in dataclasses.fields(namespace["DefaultGenerationConfig"])}
    assert shown == DefaultGenerationConfig().to_dict()


# ------------------------------------------------------------------------------------------------ bash
def command_lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def run_shell(line: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SIMPLE_GENERATION_LOG_LEVEL": "WARNING"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_build_line_keeps_an_existing_checkpoint(stand_ins, workspace):
    """The Quick start's build line, on the path that already holds the checkpoint: kept, quickly."""
    block = next(b for b in runnable("bash") if "python -m simple_generation.tiny /tmp/tiny-llama" in b.code)
    (line,) = command_lines(substitute(block.code, stand_ins, workspace))
    before = {p.name: p.stat().st_mtime_ns for p in Path(stand_ins["llama"]).iterdir()}
    done = run_shell(line, workspace)
    assert done.returncode == 0, done.stderr
    assert "exists, kept" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in Path(stand_ins["llama"]).iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in runnable("bash") if "simple_generation.tiny" not in b.code],
                         ids=lambda b: b.id)
def test_bash_block_runs_offline(block, stand_ins, workspace):
    for line in command_lines(substitute(block.code, stand_ins, workspace)):
        skipped = next((why for piece, why in SKIP_LINES if piece in line), None)
        if skipped:
            continue
        done = run_shell(line, workspace)
        assert done.returncode == 0, f"README.md:{block.line}: {line}\n{done.stderr[-3000:]}"
        for target in re.findall(r"--output (\S+)", line):
            assert (workspace / target).exists(), f"{line}: no {target}"


# ------------------------------------------------------------------------------------------------ item 23
def main_command_line() -> str:
    block = next(b for b in BLOCKS if "bash scripts/setup.sh && python -m simple_generation.tiny" in b.code)
    line = next(ln for ln in command_lines(block.code) if "simple_generation.tiny" in ln)
    assert line.startswith("bash scripts/setup.sh && ")
    return line[len("bash scripts/setup.sh && "):]   # set-up installs packages: done already here


@pytest.mark.slow
def test_main_command_line_reruns_and_resumes(tmp_path):
    """The README's main job, run twice as written (fresh paths): the second run builds nothing and
    generates nothing: every answer comes from the store, and the output is the same."""
    line = main_command_line().replace("/tmp/tiny-llama", str(tmp_path / "tiny-llama")) \
        .replace("/tmp/answers.jsonl", str(tmp_path / "answers.jsonl"))
    n_prompts = sum(1 for ln in (REPO / "examples" / "prompts.jsonl").read_text().splitlines() if ln.strip())
    first = run_shell(line, REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"\bbuilt\b", first.stderr)
    output = (tmp_path / "answers.jsonl").read_text()
    weights = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tiny-llama").iterdir()}
    second = run_shell(line, REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "exists, kept" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tiny-llama").iterdir()} == weights
    summary = second.stdout + second.stderr
    assert re.search(rf"\b{n_prompts} from the store", summary), summary[-2000:]
    assert re.search(r"\b0 generated tokens", summary), summary[-2000:]
    assert (tmp_path / "answers.jsonl").read_text() == output
    assert len(output.splitlines()) == n_prompts
    assert shlex.split(line)  # one shell line, as pasted


def test_architecture_names_real_modules():
    """The Architecture section's diagram and table name modules that exist (a rename must update it)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Architecture"):text.index("## Development")]
    names = set(re.findall(r"([\w/]+\.py)\b", section)) | set(re.findall(r"`([\w/]+/)`", section))
    assert len(names) > 15
    package = Path(__file__).resolve().parent.parent / "simple_generation"
    for name in names:
        candidates = [package / name, package / "engines" / name, package / "io" / name,
                      package.parent / name]
        assert any(c.exists() for c in candidates), f"README Architecture names {name}, which does not exist"
