"""Out-of-memory backoff and batch failures, with faults injected into real generation."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from simple_generation import BatchGenerationError, SimpleGenerator

from .conftest import PROMPTS

MAX_NEW = 6


class Fault(LogitsProcessor):
    """Raises `error` on a decoding step of a batch larger than `limit`, once `after_steps` steps ran.

    `row_steps` counts the (rows x steps) that ran without a fault: with every answer forced to
    MAX_NEW tokens, it is exactly len(prompts) * MAX_NEW when no finished batch was redone.
    """

    def __init__(self, limit, error, after_steps=0):
        self.limit, self.error, self.after_steps = limit, error, after_steps
        self.steps = 0
        self.row_steps = 0
        self.batch_sizes = []

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] > self.limit and self.steps >= self.after_steps:
            raise self.error
        if self.steps % MAX_NEW == 0:
            self.batch_sizes.append(input_ids.shape[0])
        self.steps += 1
        self.row_steps += input_ids.shape[0]
        return scores


@pytest.fixture(scope="module")
def generator(llama_path):
    return SimpleGenerator(llama_path, device="cpu")


def _run(generator, fault=None, **kwargs):
    extra = {"logits_processor": LogitsProcessorList([fault])} if fault else {}
    return generator(PROMPTS, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, temperature=0, skip_prompt=True,
                     show_progress_bar=False, **extra, **kwargs)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."),
])
def test_auto_batch_size_halves_on_oom_and_keeps_order(generator, error):
    expected = _run(generator, batch_size=1)
    fault = Fault(limit=3, error=error)
    answers = _run(generator, fault, batch_size="auto", starting_batch_size=64)
    assert answers == expected
    assert fault.row_steps == len(PROMPTS) * MAX_NEW
    assert max(fault.batch_sizes) <= 3
    assert generator.last_run.batch_size == 3  # 12 -> 6 -> 3, then kept
    assert generator.last_run.oom_retries == 2


def test_oom_mid_run_keeps_finished_batches(generator):
    expected = _run(generator, batch_size=1)
    fault = Fault(limit=2, error=torch.OutOfMemoryError("CUDA out of memory."), after_steps=MAX_NEW)
    answers = _run(generator, fault, batch_size=4)
    assert answers == expected
    assert fault.batch_sizes[0] == 4  # the first batch finished at size 4 ...
    assert fault.row_steps == len(PROMPTS) * MAX_NEW  # ... and was not recomputed
    assert generator.last_run.batch_size == 2


def test_failing_batch_raises_never_placeholder(generator):
    fault = Fault(limit=0, error=ValueError("boom"))
    with pytest.raises(BatchGenerationError, match="boom") as info:
        _run(generator, fault, batch_size=4)
    assert info.value.partial == {}
    assert isinstance(info.value.__cause__, ValueError)


def test_failure_after_some_batches_exposes_partial_results(generator):
    expected = _run(generator, batch_size=4)
    fault = Fault(limit=0, error=ValueError("boom"), after_steps=MAX_NEW)
    with pytest.raises(BatchGenerationError) as info:
        _run(generator, fault, batch_size=4)
    partial = info.value.partial
    assert len(partial) == 4
    assert all(expected[i] == answer for i, answer in partial.items())


def test_oom_at_batch_size_one_raises(generator):
    fault = Fault(limit=0, error=torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(BatchGenerationError, match="batch size 1"):
        _run(generator, fault, batch_size=2)
