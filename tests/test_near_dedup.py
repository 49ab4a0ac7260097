"""Near-duplicate detection with MinHash + LSH on crafted near-duplicates (no model involved)."""

import json
import random
import string
import sys

import pytest

pytest.importorskip("datasketch")

from simple_generation.dedup import near_duplicates, shingles  # noqa: E402


def _sentence(rng, words=40):
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(words))


def _edit(text, rng, changes):
    """``changes`` single-character substitutions at random places."""
    chars = list(text)
    for _ in range(changes):
        position = rng.randrange(len(chars))
        chars[position] = rng.choice(string.ascii_lowercase)
    return "".join(chars)


def test_crafted_near_duplicates_map_to_the_earliest_kept_text():
    rng = random.Random(0)
    originals = [_sentence(rng) for _ in range(50)]
    texts = list(originals)
    expected = {}
    for source in (3, 17, 42):
        expected[len(texts)] = source
        texts.append(originals[source].upper() + "  ")   # case and whitespace only: identical shingles
        expected[len(texts)] = source
        texts.append(_edit(originals[source], rng, 1))   # one character changed in ~250
    found = near_duplicates(texts, threshold=0.8)
    assert found == expected


def test_threshold_decides_and_distinct_texts_are_kept():
    rng = random.Random(1)
    base = _sentence(rng, 60)
    far = _edit(base, rng, 40)  # many edits: similarity well under 0.9
    assert near_duplicates([base, far], threshold=0.95) == {}
    assert near_duplicates([_sentence(rng) for _ in range(200)], threshold=0.5) == {}
    assert near_duplicates(["same text here", "same text here"], threshold=1.0) == {1: 0}


def test_no_chains_a_removed_text_is_never_a_reference():
    rng = random.Random(2)
    a = _sentence(rng, 80)
    b = _edit(a, rng, 2)
    c = _edit(b, rng, 2)
    found = near_duplicates([a, b, c], threshold=0.7)
    assert found == {1: 0, 2: 0}


def test_short_texts_and_shingles():
    assert shingles("Hi", 5) == {b"hi"}
    assert shingles("a  B\tc", 3) == {b"a b", b" b ", b"b c"}
    assert near_duplicates(["", "", "x"], threshold=0.9) == {1: 0}


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a"], threshold=0)


def test_missing_datasketch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[dedup\]\" in a clone"):
        near_duplicates(["a", "b"])


def test_dedup_command_writes_a_report(tmp_path, capsys):
    from simple_generation.cli import main

    rng = random.Random(3)
    texts = [_sentence(rng) for _ in range(5)]
    texts.insert(2, texts[0] + "!")
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    report = tmp_path / "report.jsonl"
    assert main(["dedup", str(source), "--threshold", "0.8", "--output", str(report)]) == 0
    lines = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"index": 2, "duplicate_of": 0, "source": f"{source}:3", "duplicate_of_source": f"{source}:1"}]
    assert "6 records, 1 near-duplicate(s)" in capsys.readouterr().err
    assert main(["dedup", str(source), "--output", str(source)]) == 2  # never overwrite the input
