"""Carbon emissions: codecarbon's offline tracker writes one emissions.csv row per generation call."""

import csv

import pytest

from simple_generation import SimpleGenerator

from .conftest import PROMPTS

pytest.importorskip("codecarbon")


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_call_writes_a_row_and_fills_last_run(llama_path, tmp_path):
    out = tmp_path / "emissions"
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(out))
    generator(PROMPTS[:4], max_new_tokens=4, temperature=0, show_progress_bar=False)
    first = generator.last_run
    generator(PROMPTS[4:6], max_new_tokens=4, temperature=0, show_progress_bar=False)
    second = generator.last_run
    rows = _rows(out / "emissions.csv")
    assert len(rows) == 2
    assert all(row["project_name"] == llama_path for row in rows)
    for row, run in zip(rows, (first, second)):
        assert run.energy_kwh is not None and run.energy_kwh >= 0
        assert run.energy_kwh == pytest.approx(float(row["energy_consumed"]))
        assert run.emissions_kg_co2eq == pytest.approx(float(row["emissions"]))
    assert (first.prompts, second.prompts) == (4, 2)
    assert first.generated_tokens > 0 and first.wall_time_s > 0 and first.tokens_per_second > 0


def test_default_directory_is_the_working_directory(llama_path, tmp_path):
    # conftest runs every test in its own tmp_path
    SimpleGenerator(llama_path, device="cpu")(PROMPTS[:1], max_new_tokens=2, show_progress_bar=False)
    assert len(_rows(tmp_path / "emissions.csv")) == 1


def test_track_emissions_false_writes_nothing(llama_path, tmp_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False, emissions_dir=str(tmp_path / "e"))
    generator(PROMPTS[:2], max_new_tokens=2, show_progress_bar=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "emissions.csv").exists()
    assert generator.last_run.energy_kwh is None


def test_a_failing_call_is_still_recorded(llama_path, tmp_path):
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(tmp_path))
    with pytest.raises(Exception):  # noqa: B017 - any failure inside generation
        generator(PROMPTS[:2], max_new_tokens=2, show_progress_bar=False, logits_processor=[_Boom()])
    assert len(_rows(tmp_path / "emissions.csv")) == 1


class _Boom:
    def __call__(self, input_ids, scores):
        raise RuntimeError("boom")
