"""The one parameters object (SamplingParams: aliases, checks naming where a value came from, text cells) and
ParamsBuilder (precedence, fingerprints, stop strings, greedy at temperature 0), with a tiny real tokenizer and
generation config (tests/conftest.py); one test runs the tiny model end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

from simple_generation.config import DefaultGenerationConfig
from simple_generation.io import read_records
from simple_generation.io.records import InputError, split_params
from simple_generation.params import ParamsBuilder
from simple_generation.sampling_params import PER_PROMPT_KEYS, SamplingParams, value_of


# ------------------------------------------------------------------ SamplingParams
@pytest.mark.parametrize("values", [{"max_new_tokens": 3}, {"max_tokens": 3}, {"max_completion_tokens": 3}])
def test_every_name_of_max_new_tokens_is_the_same_setting(values):
    assert SamplingParams.from_dict(values) == SamplingParams(max_new_tokens=3)
    assert value_of(values, "max_new_tokens") == 3


def test_aliases_and_canonical_names():
    params = SamplingParams.from_dict({"n": 2, "stop": "END"}, "call")
    assert params == SamplingParams(num_return_sequences=2, stop_strings=("END",))
    assert params.to_dict() == {"num_return_sequences": 2, "stop_strings": ["END"]}
    assert SamplingParams.from_dict({"stop_strings": ["a", "b"]}).stop_strings == ("a", "b")


@pytest.mark.parametrize("values", [{"max_tokens": 1, "max_completion_tokens": 2}, {"n": 2, "num_return_sequences": 2},
                                    {"stop": "a", "stop_strings": "b"}])
def test_two_names_of_one_setting_are_refused(values):
    first, second = values
    with pytest.raises(ValueError, match=rf"^params\[2\]: pass either `{first}` or `{second}`, not both"):
        SamplingParams.from_dict(values, "params[2]")


@pytest.mark.parametrize("values, message", [
    ({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1, got 0"),
    ({"max_tokens": 2.5}, "`max_tokens` (`max_new_tokens`) must be an integer, got 2.5"),
    ({"max_new_tokens": True}, "`max_new_tokens` must be an integer"),
    ({"temperature": -0.5}, "`temperature` must be >= 0"),
    ({"temperature": "hot"}, "`temperature` must be a number"),
    ({"temperature": float("nan")}, "`temperature` must be a finite number"),
    ({"top_p": 0}, "`top_p` must be in (0, 1]"),
    ({"top_p": 1.5}, "`top_p` must be in (0, 1]"),
    ({"min_p": 1.5}, "`min_p` must be in [0, 1]"),
    ({"top_k": -3}, "`top_k` must be >= 0"),
    ({"n": 0}, "`n` (`num_return_sequences`) must be >= 1"),
    ({"num_beams": 0}, "`num_beams` must be >= 1"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be > 0"),
    ({"do_sample": "yes"}, "`do_sample` must be true or false"),
    ({"seed": True}, "`seed` must be an integer"),
    ({"stop": 3}, "`stop` (`stop_strings`) must be a string or a list of strings"),
    ({"stop": ["ok", ""]}, "an empty stop string"),
])
@pytest.mark.parametrize("where", ["call", "params[3]", "file.jsonl:13: record 12", "--generation"])
def test_invalid_values_name_where_they_came_from(values, message, where):
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict(values, where)
    assert str(info.value).startswith(f"{where}: {message}")


def test_direct_construction_is_checked_the_same_way():
    with pytest.raises(ValueError, match="`top_p` must be in"):
        SamplingParams(top_p=2)
    assert SamplingParams(max_new_tokens=20.0, stop_strings="x") == SamplingParams(max_new_tokens=20,
                                                                                   stop_strings=("x",))
    with pytest.raises(ValueError, match="give them as fields"):
        SamplingParams(extra={"max_tokens": 3})


def test_none_is_not_set_and_integral_floats_are_integers():
    assert SamplingParams.from_dict({"max_new_tokens": None, "temperature": None}) == SamplingParams()
    assert SamplingParams.from_dict({"max_new_tokens": None, "max_tokens": 3}).max_new_tokens == 3
    assert SamplingParams.from_dict({"max_new_tokens": 20.0, "seed": 7.0}).to_dict() == {"max_new_tokens": 20,
                                                                                        "seed": 7}


def test_from_text_reads_csv_cells():
    cells = {"max_new_tokens": "5", "temperature": "", "top_p": " 0.5 ", "stop": '["END", "STOP"]', "do_sample": "True",
             "seed": "7", "n": ""}
    params = SamplingParams.from_dict(cells, "p.csv:3: record 1", from_text=True)
    assert params == SamplingParams(max_new_tokens=5, top_p=0.5, stop_strings=("END", "STOP"), do_sample=True, seed=7)
    assert SamplingParams.from_dict({"stop": "[not json"}, from_text=True).stop_strings == ("[not json",)
    assert SamplingParams.from_dict({"stop": '["a"]'}).stop_strings == ('["a"]',)  # not text: taken as it is
    with pytest.raises(ValueError, match=r"^p\.csv:3: record 1: `max_new_tokens` must be an integer, got 'lots'"):
        SamplingParams.from_dict({"max_new_tokens": "lots"}, "p.csv:3: record 1", from_text=True)
    with pytest.raises(ValueError, match="must be an integer"):
        SamplingParams.from_dict({"max_new_tokens": "5"}, "call")  # text is read only from text cells


def test_temperature_decides_sampling():
    assert SamplingParams(temperature=0).sampled is False
    assert SamplingParams(temperature=0, do_sample=True).sampled is False  # 0 is greedy, whatever do_sample says
    assert SamplingParams(temperature=0.7).sampled is True
    assert SamplingParams(temperature=0.7, do_sample=False).sampled is False
    assert SamplingParams(top_p=0.5).sampled is None  # not said: the level below decides
    assert SamplingParams(temperature=0.7).overrides() == {"temperature": 0.7, "do_sample": True}
    assert SamplingParams(temperature=0.7).to_dict() == {"temperature": 0.7}  # as given


def test_merge_puts_the_prompt_over_the_call():
    call = SamplingParams(max_new_tokens=8, temperature=0, top_k=5, extra={"no_repeat_ngram_size": 3})
    merged = call.merge(SamplingParams(temperature=0.9, top_k=7))
    assert merged == SamplingParams(max_new_tokens=8, temperature=0.9, top_k=7, extra={"no_repeat_ngram_size": 3})
    assert merged.sampled is True
    assert SamplingParams(do_sample=False).merge(SamplingParams(temperature=0.9)).sampled is True
    assert SamplingParams(temperature=0.9).merge(SamplingParams(temperature=0)).sampled is False
    assert SamplingParams(temperature=0.9).merge(SamplingParams(do_sample=False)).sampled is False
    assert SamplingParams(temperature=0).merge(SamplingParams(top_p=0.5)).sampled is False
    assert SamplingParams(stop_strings=("a",)).merge(SamplingParams(stop_strings=())).stop_strings == ()


def test_per_prompt_keys_and_whole_call_settings():
    assert {"max_completion_tokens", "max_tokens", "n", "stop", "seed", "do_sample"} <= PER_PROMPT_KEYS
    with pytest.raises(ValueError, match=r"^params\[1\]: unknown parameter 'colour'; per-prompt parameters are"):
        SamplingParams.from_dict({"colour": "red"}, "params[1]", per_prompt=True)
    for key in ("num_beams", "min_new_tokens", "no_repeat_ngram_size", "logits_processor"):
        with pytest.raises(ValueError, match=rf"^params\[0\]: `{key}` cannot be set per prompt"):
            SamplingParams.from_dict({key: 2}, "params[0]", per_prompt=True)
    call = SamplingParams.from_dict({"num_beams": 2, "no_repeat_ngram_size": 3, "n": 2})
    assert call.num_beams == 2 and call.extra == {"no_repeat_ngram_size": 3}
    assert call.to_dict() == {"num_return_sequences": 2, "num_beams": 2, "no_repeat_ngram_size": 3}


def test_the_same_key_means_the_same_thing_at_every_entry_point(tmp_path):
    given = {"max_completion_tokens": 3, "n": 2, "stop": "x", "temperature": 0.5}
    expected = SamplingParams(max_new_tokens=3, num_return_sequences=2, stop_strings=("x",), temperature=0.5)
    assert SamplingParams.from_dict(given, "call") == expected
    assert SamplingParams.from_dict(given, "params[0]", per_prompt=True) == expected
    params, fields = split_params({"prompt": "p", "id": 1, **given}, "f.jsonl:1: record 0", exclude=("prompt",))
    assert SamplingParams.from_dict(params) == expected and fields == {"id": 1}
    openai = {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "p"}], **given}}
    csv_text = "prompt,max_completion_tokens,n,stop,temperature\np,3,2,x,0.5\n"
    (tmp_path / "o.jsonl").write_text(json.dumps(openai) + "\n", encoding="utf-8")
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "p", **given}) + "\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text(csv_text, encoding="utf-8")
    for name in ("o.jsonl", "r.jsonl", "c.csv"):
        record = next(iter(read_records(tmp_path / name)))
        assert SamplingParams.from_dict(record.params) == expected, name


def test_record_errors_are_input_errors_naming_the_record():
    with pytest.raises(InputError, match=r"^f\.jsonl:3: record 2: `top_k` must be >= 0"):
        split_params({"prompt": "p", "top_k": -1}, "f.jsonl:3: record 2")
    with pytest.raises(InputError, match=r"f\.jsonl:3: record 2: `num_beams` is a generation setting"):
        split_params({"prompt": "p", "num_beams": 2}, "f.jsonl:3: record 2")


def test_import_is_torch_free():
    code = ("import sys, simple_generation.sampling_params; "
            "heavy = [m for m in ('torch', 'transformers', 'simple_generation.params', 'simple_generation.config', "
            "'simple_generation.generator') if m in sys.modules]; print(heavy)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ ParamsBuilder
@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="module")
def model_config(llama_path):
    config = GenerationConfig.from_pretrained(llama_path)
    config.repetition_penalty = 1.3  # a setting the model ships
    config.top_k = 3  # a sampling default of the model: DefaultGenerationConfig replaces it
    return config


def builder_for(model_config, tokenizer, defaults=None, **options):
    return ParamsBuilder(model_config, defaults or DefaultGenerationConfig(), tokenizer.pad_token_id, tokenizer,
                         **options)


def test_precedence_model_then_defaults_then_call_then_prompt(model_config, tokenizer):
    builder = builder_for(model_config, tokenizer, DefaultGenerationConfig(max_new_tokens=7, top_p=0.9))
    plain, called, own = builder.for_prompts({"top_k": 5}, [None, {}, {"top_k": 9, "max_tokens": 4}], 3)
    assert plain is called
    assert plain.config.repetition_penalty == 1.3  # the model's
    assert (plain.config.max_new_tokens, plain.config.top_p) == (7, 0.9)  # the defaults'
    assert plain.config.top_k == 5  # the call's
    assert (own.config.top_k, own.max_new_tokens, own.config.top_p) == (9, 4, 0.9)  # the prompt's, over the call's
    assert model_config.top_k == 3, "the model's own config must not be modified"


def test_fingerprints_follow_what_changes_an_answer(model_config, tokenizer):
    call = {"max_new_tokens": 4, "temperature": 0}
    first = builder_for(model_config, tokenizer).for_prompts(call, None, 1)[0]
    # equal settings, however spelled and in whichever builder: equal fingerprints
    again = builder_for(model_config, tokenizer).for_prompts({"max_tokens": 4, "do_sample": False}, [{}], 1)[0]
    assert again.fingerprint == first.fingerprint
    changed = [{"max_new_tokens": 5}, {"seed": 1}, {"stop": "x"}, {"repetition_penalty": 1.1},
               {"temperature": 0.7}, {"n": 2, "temperature": 0.7}]
    builder = builder_for(model_config, tokenizer)
    prints = [p.fingerprint for p in builder.for_prompts(call, changed, len(changed))]
    assert first.fingerprint not in prints and len(set(prints)) == len(prints)
    # greedy rows that differ only in budget or seed may share a batch; beams need equal budgets
    budget, seed = builder.for_prompts(call, [{"max_new_tokens": 9}, {"seed": 3}], 2)
    assert budget.batch_key == seed.batch_key == first.batch_key
    beams = builder.for_prompts({**call, "num_beams": 2}, [{"max_new_tokens": 9}, None], 2)
    assert beams[0].batch_key != beams[1].batch_key


def test_stop_strings_and_template_stops(model_config, tokenizer):
    builder = builder_for(model_config, tokenizer, template_stop_strings=["USER:"], template_stop_ids=[5])
    own, plain = builder.for_prompts({"stop": ["END"]}, [{"stop": ["X", "USER:"]}, None], 2)
    assert own.stop_strings == ("X", "USER:") and plain.stop_strings == ("END", "USER:")
    assert own.call_kwargs["tokenizer"] is tokenizer  # HF's stop strings need the tokenizer
    eos = model_config.eos_token_id if isinstance(model_config.eos_token_id, list) else [model_config.eos_token_id]
    assert plain.config.eos_token_id == eos + [5]  # a template's stop token ends an answer as EOS does
    told = builder.for_prompts({"eos_token_id": 4}, None, 1)[0]
    assert told.config.eos_token_id == 4  # the caller's own EOS wins
    assert builder_for(model_config, tokenizer).for_prompts({}, None, 1)[0].stop_strings == ()


def test_temperature_zero_is_greedy_at_every_level(model_config, tokenizer):
    builder = builder_for(model_config, tokenizer)
    greedy, sampled = builder.for_prompts({"temperature": 0.9, "do_sample": True},
                                          [{"temperature": 0}, {"top_p": 0.5}], 2)
    assert greedy.deterministic and greedy.config.temperature is None and greedy.config.top_k is None
    assert sampled.sampled and sampled.config.temperature == 0.9
    # a prompt's temperature > 0 samples under a greedy call
    assert builder.for_prompts({"do_sample": False}, [{"temperature": 0.5}], 1)[0].sampled
    assert builder.for_prompts({"temperature": 0}, [{"temperature": 0.5}], 1)[0].sampled
    # ... and a call's does too, over defaults that do not sample
    quiet = builder_for(model_config, tokenizer, DefaultGenerationConfig(do_sample=False))
    assert not quiet.for_prompts({}, None, 1)[0].sampled
    assert quiet.for_prompts({"temperature": 0.5}, None, 1)[0].sampled


def test_builder_errors_name_their_place(model_config, tokenizer):
    builder = builder_for(model_config, tokenizer)
    with pytest.raises(ValueError, match=r"^params\[1\]: `max_completion_tokens` \(`max_new_tokens`\) must be >= 1"):
        builder.for_prompts({}, [None, {"max_completion_tokens": 0}], 2)
    with pytest.raises(ValueError, match=r"^params\[0\]: num_return_sequences=2 needs sampling"):
        builder.for_prompts({"temperature": 0}, [{"n": 2}], 1)
    with pytest.raises(ValueError, match="one dict"):
        builder.for_prompts({}, [None], 2)
    with pytest.raises(ValueError, match=r"params\[0\] must be a dict"):
        builder.for_prompts({}, ["hot"], 1)
    with pytest.raises(ValueError, match=r"^call: `temperature` must be >= 0"):
        builder.for_prompts({"temperature": -1}, None, 1)
    with pytest.raises(TypeError, match="max_new_tokenz"):
        builder.for_prompts({"max_new_tokenz": 3}, None, 1)
    with pytest.raises(ValueError, match=r"^generation_defaults: `max_new_tokens` must be >= 1"):
        builder_for(model_config, tokenizer, DefaultGenerationConfig(max_new_tokens=0))


def test_sampling_params_objects_per_prompt(model_config, tokenizer):
    builder = builder_for(model_config, tokenizer)
    typed, spelled = builder.for_prompts({"temperature": 0}, [SamplingParams(max_new_tokens=3), {"max_tokens": 3}], 2)
    assert typed is spelled
    with pytest.raises(ValueError, match=r"params\[0\]: `num_beams` cannot be set per prompt"):
        builder.for_prompts({}, [SamplingParams(num_beams=2)], 1)


# ------------------------------------------------------------------ end to end
def test_max_completion_tokens_per_prompt_works_as_in_a_file_record(llama_path, tmp_path):
    from simple_generation import SimpleGenerator

    gen = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    call = dict(temperature=0, skip_prompt=True, show_progress_bar=False, max_new_tokens=12)
    prompt = "Tell me a story"
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": prompt, "max_completion_tokens": 3}) + "\n",
                                       encoding="utf-8")
    record = next(iter(read_records(tmp_path / "in.jsonl")))
    from_record = gen.generate([record.prompt], params=[record.params], **call)[0]
    from_python = gen.generate([prompt], params=[{"max_completion_tokens": 3}], **call)[0]
    canonical = gen.generate([prompt], params=[{"max_new_tokens": 3}], **call)[0]
    assert from_python.error is None and from_python.completion_tokens <= 3
    assert from_python.text == from_record.text == canonical.text
    del call["max_new_tokens"]
    assert gen.generate([prompt], max_completion_tokens=3, **call)[0].text == canonical.text  # the call's too


def test_command_line_generation_values_are_checked_the_same_way():
    from simple_generation.cli import _check_generation_combination, _check_generation_values
    from simple_generation.errors import UsageError

    _check_generation_values({"max_completion_tokens": 3, "no_repeat_ngram_size": 2})
    with pytest.raises(UsageError, match=r"^--generation n: `n` \(`num_return_sequences`\) must be >= 1"):
        _check_generation_values({"n": 0})
    with pytest.raises(UsageError, match="pass either `max_tokens` or `max_completion_tokens`, not both"):
        _check_generation_values({"max_tokens": 3, "max_completion_tokens": 4})
    _check_generation_combination({"n": 2, "temperature": 0.7})
    with pytest.raises(UsageError, match="-n 2 needs sampling"):
        _check_generation_combination({"n": 2, "temperature": 0})
