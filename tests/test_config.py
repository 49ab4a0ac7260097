"""Generation defaults: precedence between the model's config, DefaultGenerationConfig and the call."""

import logging
import shutil

import pytest
from transformers import GenerationConfig

from simple_generation import DefaultGenerationConfig, SimpleGenerator
from simple_generation.config import build_generation_config
from simple_generation.sampling_params import SamplingParams

from .reference import hf_greedy, load_reference


def test_defaults_replace_sampling_but_keep_special_tokens():
    model_config = GenerationConfig(do_sample=False, temperature=0.2, top_k=3, top_p=0.5, max_new_tokens=20,
                                    eos_token_id=[2, 7], decoder_start_token_id=0, bos_token_id=1,
                                    repetition_penalty=1.3)
    config = build_generation_config(model_config, DefaultGenerationConfig(), {}, pad_token_id=5)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 50, 1.0)
    assert config.max_new_tokens == 512 and config.num_return_sequences == 1
    assert config.eos_token_id == [2, 7] and config.decoder_start_token_id == 0 and config.bos_token_id == 1
    assert config.repetition_penalty == 1.3
    assert config.pad_token_id == 5
    assert model_config.top_k == 3, "the model's own config must not be modified"


def test_call_overrides_everything_and_temperature_zero_is_greedy():
    call = SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 9, "eos_token_id": 4}, "call")
    config = build_generation_config(GenerationConfig(eos_token_id=2), DefaultGenerationConfig(), call.overrides(),
                                     pad_token_id=None)
    assert config.do_sample is False and config.max_new_tokens == 9 and config.eos_token_id == 4


def test_generation_defaults_argument(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False,
                                generation_defaults=DefaultGenerationConfig(max_new_tokens=3, do_sample=False))
    answers = generator(["Hello there"], skip_prompt=True, show_progress_bar=False)
    assert generator.last_run.generated_tokens <= 3
    assert answers == hf_greedy(llama_path, ["Hello there"], 3)


def test_model_eos_list_is_kept(llama_path, tmp_path):
    """A model whose generation_config lists two EOS ids stops at either, as HF's generate does."""
    prompt = "Tell me what is two plus two?"
    model, tokenizer = load_reference(llama_path)
    inputs = tokenizer(prompt, return_tensors="pt")
    new_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    third = new_ids[2]
    assert third not in new_ids[:2] and third != tokenizer.eos_token_id
    free = tokenizer.decode(new_ids, skip_special_tokens=True)
    path = tmp_path / "two-eos"
    shutil.copytree(llama_path, path)
    config = GenerationConfig.from_pretrained(path)
    config.eos_token_id = [tokenizer.eos_token_id, third]
    config.save_pretrained(path)
    generator = SimpleGenerator(str(path), device="cpu", track_emissions=False)
    answers = generator([prompt, "Hi"], max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert answers == hf_greedy(str(path), [prompt, "Hi"], 8)
    assert generator.last_run.generated_tokens < 16
    assert answers[0] == tokenizer.decode(new_ids[:3], skip_special_tokens=True) != free


def test_log_batch_sample_logs_every_n_batches(llama_path, caplog):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    with caplog.at_level(logging.INFO, logger="simple_generation"):
        generator(["a", "b", "c", "d", "e", "f"], batch_size=1, log_batch_sample=2, max_new_tokens=2,
                  show_progress_bar=False)
    samples = [r for r in caplog.records if "Sample from batch" in r.getMessage()]
    assert len(samples) == 3


@pytest.mark.parametrize("value", [True, "x", 1.5])
def test_bad_max_new_tokens_type(value):  # values are checked where they come in, once (SamplingParams)
    with pytest.raises(ValueError, match="call: `max_new_tokens` must be an integer"):
        SamplingParams.from_dict({"max_new_tokens": value}, "call")
