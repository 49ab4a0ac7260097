"""Batch jobs in the library: results as objects, the store and resume, dedup, per-prompt parameters,
reproducible sampling, bad prompts recorded instead of fatal."""

import sqlite3

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from simple_generation import BatchGenerationError, GenerationInterrupted, GenerationResult, SimpleGenerator

from .conftest import PROMPTS
from .reference import hf_greedy, load_reference

GREEDY = {"temperature": 0, "skip_prompt": True, "show_progress_bar": False}


@pytest.fixture(scope="module")
def gen(llama_path):
    return SimpleGenerator(llama_path, device="cpu", track_emissions=False)


class RowCounter(LogitsProcessor):
    """Counts the rows of the first decoding step of each batch: how many sequences were generated."""

    def __init__(self):
        self.rows = 0
        self._last_len = None

    def __call__(self, input_ids, scores):
        if self._last_len is None or input_ids.shape[1] <= self._last_len:
            self.rows += input_ids.shape[0]
        self._last_len = input_ids.shape[1]
        return scores


def test_generate_returns_results_in_order_with_counts(gen):
    results = gen.generate(PROMPTS[:5], max_new_tokens=5, batch_size=2, **GREEDY)
    assert [r.index for r in results] == list(range(5))
    assert all(isinstance(r, GenerationResult) and r.error is None for r in results)
    assert [r.text for r in results] == gen(PROMPTS[:5], max_new_tokens=5, batch_size=1, **GREEDY)
    for r in results:
        assert 1 <= r.completion_tokens <= 5 and r.prompt_tokens > 0
        assert r.finish_reason in ("stop", "length")
        assert len(r.token_ids[0]) <= 5
    assert any(r.finish_reason == "length" for r in results)


def test_store_resume_skips_answered_and_never_reuses_for_other_params(gen, tmp_path):
    store = tmp_path / "run.sqlite"
    first = gen.generate(PROMPTS[:4], max_new_tokens=4, store=str(store), **GREEDY)
    assert gen.last_run.cached == 0
    counter = RowCounter()
    again = gen.generate(PROMPTS, max_new_tokens=4, store=str(store), logits_processor=None, **GREEDY)
    assert gen.last_run.cached == 4
    assert [r.text for r in again[:4]] == [r.text for r in first]
    assert all(r.cached for r in again[:4]) and not any(r.cached for r in again[4:])
    # other parameters: nothing reused
    counter = RowCounter()
    gen.generate(PROMPTS[:4], max_new_tokens=5, store=str(store), logits_processor=LogitsProcessorList([counter]),
                 **GREEDY)
    assert gen.last_run.cached == 0 and counter.rows == 4
    # readable with nothing of ours
    rows = sqlite3.connect(store).execute("SELECT prompt, texts, finish_reasons, error FROM results").fetchall()
    assert len(rows) == len(PROMPTS) + 4
    assert all(error is None for *_, error in rows)


def test_store_skip_prompt_false_echoes_cached_answers(gen, tmp_path):
    store = str(tmp_path / "echo.sqlite")
    kwargs = {"max_new_tokens": 4, "temperature": 0, "show_progress_bar": False}
    fresh = gen(PROMPTS[:3], store=store, **kwargs)
    cached = gen(PROMPTS[:3], store=store, **kwargs)
    assert gen.last_run.cached == 3
    assert cached == fresh and all(a.startswith(p.strip()[:2]) for a, p in zip(fresh, PROMPTS[:3]))


def test_exact_duplicates_generated_once_and_fanned_out(gen):
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[1], PROMPTS[1], PROMPTS[4], PROMPTS[0]]
    counter = RowCounter()
    answers = gen(prompts, max_new_tokens=4, batch_size=8, logits_processor=LogitsProcessorList([counter]), **GREEDY)
    assert counter.rows == 3
    assert gen.last_run.deduplicated == 3
    assert answers[0] == answers[2] == answers[3] and answers[1] == answers[4]
    assert answers == gen(prompts, max_new_tokens=4, batch_size=1, dedup=False, **GREEDY)


def test_sampled_copies_get_independent_samples(gen):
    answers = gen(["Once upon a time"] * 4, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0,
                  seed=7, skip_prompt=True, show_progress_bar=False)
    assert len(set(answers)) > 1
    assert gen.last_run.deduplicated == 0


@pytest.mark.parametrize("batch_size", [1, 4, "auto"])
def test_seeded_sampling_independent_of_batch_and_position(gen, batch_size):
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "top_p": 0.95, "seed": 1234,
              "skip_prompt": True, "show_progress_bar": False}
    reference = gen(PROMPTS[:6], batch_size=6, **kwargs)
    shuffled = [5, 3, 0, 1, 4, 2]
    answers = gen([PROMPTS[i] for i in shuffled] + PROMPTS[6:9], batch_size=batch_size, **kwargs)
    assert answers[:6] == [reference[i] for i in shuffled]
    assert gen(PROMPTS[:6], batch_size=batch_size, **{**kwargs, "seed": 99}) != reference


def test_seeded_sampling_same_after_resume(gen, tmp_path):
    kwargs = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "seed": 5, "show_progress_bar": False,
              "skip_prompt": True}
    whole = gen(PROMPTS[:6], **kwargs)
    store = str(tmp_path / "s.sqlite")
    gen(PROMPTS[:3], store=store, **kwargs)
    assert gen(PROMPTS[:6], store=store, **kwargs) == whole
    assert gen.last_run.cached == 3


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_per_prompt_max_new_tokens_in_one_batch(llama_path, engine):
    gen = SimpleGenerator(llama_path, device="cpu", track_emissions=False, engine=engine)
    prompts = PROMPTS[:4]
    params = [{"max_new_tokens": 3}, None, {"max_tokens": 3}, None]
    results = gen.generate(prompts, params=params, max_new_tokens=12, min_new_tokens=3, batch_size=8, **GREEDY)
    assert gen.last_run.engine == engine
    if engine == "static":
        assert gen.last_run.batches == 1
    assert [r.completion_tokens <= 3 for r in results] == [True, False, True, False]
    reference = load_reference(llama_path)
    for r, p, budget in zip(results, prompts, (3, 12, 3, 12)):
        assert r.text == hf_greedy(llama_path, [p], budget, model_and_tokenizer=reference, min_new_tokens=3)[0]


def test_per_prompt_params_errors_name_the_record(gen):
    with pytest.raises(ValueError, match=r"params\[1\].*unknown parameter 'colour'"):
        gen(PROMPTS[:2], params=[None, {"colour": "red"}], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"params\[0\].*temperature"):
        gen(PROMPTS[:2], params=[{"temperature": -1}, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="one dict"):
        gen(PROMPTS[:2], params=[None], max_new_tokens=2)


def test_per_prompt_stop_and_seed(gen):
    base = gen.generate(PROMPTS[:2], max_new_tokens=10, **GREEDY)
    cut = base[0].text[2:5]
    assert cut
    results = gen.generate(PROMPTS[:2], params=[{"stop": cut}, None], max_new_tokens=10, **GREEDY)
    assert results[0].text == base[0].text[: base[0].text.find(cut)]
    assert results[0].finish_reason == "stop_string"
    assert results[1].text == base[1].text


class Poison(LogitsProcessor):
    """Fails any batch holding a row whose prompt contains `token`."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        if (input_ids == self.token).any(dim=1).any():
            raise RuntimeError("poisoned row")
        return scores


def test_on_error_record_isolates_the_failing_prompt(gen):
    poison_id = gen.tokenizer("dinosaurs", add_special_tokens=False)["input_ids"][-1]
    poisoned = [i for i, p in enumerate(PROMPTS) if poison_id in gen.tokenizer(p)["input_ids"]]
    assert poisoned
    processors = LogitsProcessorList([Poison(poison_id)])
    results = gen.generate(PROMPTS, max_new_tokens=3, batch_size=4, on_error="record",
                           logits_processor=processors, **GREEDY)
    assert gen.last_run.failed == len(poisoned)
    assert [i for i, _ in gen.last_run.failures] == poisoned
    expected = gen(PROMPTS, max_new_tokens=3, batch_size=4, **GREEDY)
    for i, r in enumerate(results):
        if i in poisoned:
            assert r.text is None and "poisoned row" in r.error
        else:
            assert r.error is None and r.text == expected[i]
    with pytest.raises(BatchGenerationError, match="poisoned row"):
        gen(PROMPTS, max_new_tokens=3, batch_size=4, logits_processor=processors, **GREEDY)


def test_too_long_prompt_recorded_or_raised_before_work(gen):
    long_prompt = "word " * 400
    with pytest.raises(ValueError, match="context"):
        gen([PROMPTS[0], long_prompt], max_new_tokens=3, **GREEDY)
    results = gen.generate([PROMPTS[0], long_prompt], max_new_tokens=3, on_error="record", **GREEDY)
    assert results[0].error is None and results[1].error and "context" in results[1].error


def test_failed_prompts_are_retried_by_a_rerun(gen, tmp_path):
    store = str(tmp_path / "f.sqlite")
    poison_id = gen.tokenizer("dinosaurs", add_special_tokens=False)["input_ids"][-1]
    processors = LogitsProcessorList([Poison(poison_id)])
    first = gen.generate(PROMPTS, max_new_tokens=3, store=store, on_error="record", logits_processor=processors,
                         **GREEDY)
    failed = [r.index for r in first if r.error]
    again = gen.generate(PROMPTS, max_new_tokens=3, store=store, on_error="record", logits_processor=processors,
                         **GREEDY)
    assert failed and [r.index for r in again if r.error] == failed  # failures are retried, not cached ...
    assert gen.last_run.cached == len(PROMPTS) - len(failed)  # ... answers are


class InterruptAfter(LogitsProcessor):
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, input_ids, scores):
        self.steps -= 1
        if self.steps < 0:
            raise KeyboardInterrupt
        return scores


def test_ctrl_c_keeps_finished_answers_on_partial(gen):
    with pytest.raises(GenerationInterrupted) as info:
        gen(PROMPTS, max_new_tokens=2, min_new_tokens=2, batch_size=4,
            logits_processor=LogitsProcessorList([InterruptAfter(5)]), **GREEDY)
    assert isinstance(info.value, KeyboardInterrupt)
    partial = info.value.partial
    assert len(partial) == 8  # two batches of 4 finished (2 steps each) before the 6th step was interrupted
    expected = gen(PROMPTS, max_new_tokens=2, min_new_tokens=2, batch_size=4, **GREEDY)
    assert all(expected[i] == answer for i, answer in partial.items())


def test_num_return_sequences_results(gen):
    results = gen.generate(PROMPTS[:3], num_return_sequences=2, do_sample=True, seed=3, max_new_tokens=4,
                           skip_prompt=True, show_progress_bar=False)
    assert all(len(r.texts) == 2 and len(r.token_ids) == 2 and isinstance(r.answer, list) for r in results)


def test_generated_tokens_count_only_new_work(gen, tmp_path):
    store = str(tmp_path / "c.sqlite")
    gen(PROMPTS[:3], max_new_tokens=3, store=store, **GREEDY)
    assert gen.last_run.generated_tokens > 0
    gen(PROMPTS[:3], max_new_tokens=3, store=store, **GREEDY)
    assert gen.last_run.generated_tokens == 0 and gen.last_run.cached == 3


def test_store_path_in_missing_folder_fails_before_work(gen, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gen(PROMPTS[:2], max_new_tokens=2, store=str(tmp_path / "nope" / "x.sqlite"))


def test_seed_reproducible_across_generators(llama_path, gen):
    other = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    kwargs = {"max_new_tokens": 6, "do_sample": True, "seed": 11, "show_progress_bar": False}
    torch.manual_seed(0)
    first = gen(PROMPTS[:4], **kwargs)
    torch.manual_seed(1)
    assert other(PROMPTS[:4], **kwargs) == first


def test_per_prompt_temperature_samples_under_a_greedy_call(gen):
    params = [{"temperature": 1.5, "seed": s} for s in (1, 2, 3)]
    answers = gen(["Once upon a time"] * 3, params=params, max_new_tokens=10, temperature=0, skip_prompt=True,
                  show_progress_bar=False)
    assert len(set(answers)) > 1
