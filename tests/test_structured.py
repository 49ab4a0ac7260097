"""Structured output (json_schema / json / regex / choices / grammar) with XGrammar on the HF engines.

A tiny RANDOM model: without the grammar its answers are noise; with it every answer that did not run out of
max_new_tokens must parse and conform.
"""

import json
import re

import pytest

from simple_generation.sampling_params import SamplingParams

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from simple_generation import SimpleGenerator  # noqa: E402

from .reference import hf_greedy, load_reference  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "member": {"type": "boolean"}},
          "required": ["name", "age", "member"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                   "maxItems": 3},
                                          "score": {"type": "number"}},
         "required": ["tags"]}
PROMPTS = ["Describe a person as JSON.", "hello there", "What is the most popular programming language?",
           "Numbers: 0 1 2 3", "Once upon a time", "Unicode: caffè"]


@pytest.fixture(scope="module")
def generators(llama_path):
    return {engine: SimpleGenerator(llama_path, engine=engine, track_emissions=False)
            for engine in ("static", "continuous")}


def run(gen, prompts, **kwargs):
    kwargs.setdefault("show_progress_bar", False)
    return list(gen.generate(prompts, skip_prompt=True, **kwargs))


def check_json(output, schema=None):
    """The answer parses and validates unless it ran out of tokens; True when it was complete."""
    if output.finish_reason == "length":
        return False
    assert output.finish_reason == "stop", output
    value = json.loads(output.text)
    if schema is not None:
        jsonschema.validate(value, schema)
    return True


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_json_schema_answers_validate(generators, engine):
    gen = generators[engine]
    results = run(gen, PROMPTS, max_new_tokens=64, temperature=0, json_schema=PERSON)
    complete = [check_json(r.outputs[0], PERSON) for r in results]
    assert sum(complete) >= len(PROMPTS) // 2
    sampled = run(gen, PROMPTS[:3], max_new_tokens=64, temperature=1.0, seed=3, n=2, json_schema=ITEMS)
    outputs = [o for r in sampled for o in r.outputs]
    assert len(outputs) == 6
    assert sum(check_json(o, ITEMS) for o in outputs) >= 3


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_any_json_regex_and_choices(generators, engine):
    gen = generators[engine]
    params = [{"json": True}, {"regex": r"[0-9]{3}-[a-z]{2,5}"}, {"choices": ["yes", "no", "it depends"]},
              {"grammar": 'root ::= "(" ("x" | "y")+ ")"'}, {"regex": r"(cat|dog)s?"}, {"choices": ["å", "b c"]}]
    results = run(gen, PROMPTS, max_new_tokens=40, temperature=0, params=params)
    assert check_json(results[0].outputs[0])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", results[1].answer)
    assert results[2].answer in ("yes", "no", "it depends")
    if results[3].outputs[0].finish_reason != "length":
        assert re.fullmatch(r"\((x|y)+\)", results[3].answer)
    assert re.fullmatch(r"(cat|dog)s?", results[4].answer)
    assert results[5].answer in ("å", "b c")
    for r in results:
        if r.outputs[0].finish_reason != "length":
            assert r.outputs[0].finish_reason == "stop"


def test_engines_agree_and_free_rows_equal_unbatched_hf(generators, llama_path):
    """One continuous batch mixing two schemas, a regex and free prompts: free greedy answers are HF's unbatched
    ones; constrained greedy answers are the static engine's (the same grammar, the same masks)."""
    params = [{"json_schema": PERSON}, None, {"json_schema": ITEMS}, None, {"regex": "[a-z]{1,8}!"}, None]
    kwargs = dict(max_new_tokens=24, temperature=0, params=params)
    continuous = run(generators["continuous"], PROMPTS, **kwargs)
    static = run(generators["static"], PROMPTS, **kwargs)
    assert [r.answer for r in continuous] == [r.answer for r in static]
    reference = load_reference(llama_path)
    for i in (1, 3, 5):
        assert continuous[i].answer == hf_greedy(llama_path, [PROMPTS[i]], 24, reference)[0]
    for i, schema in ((0, PERSON), (2, ITEMS)):
        check_json(continuous[i].outputs[0], schema)
    assert re.fullmatch("[a-z]{1,8}!", continuous[4].answer)


@pytest.mark.slow
def test_seeded_sampling_agrees_between_engines(generators):
    kwargs = dict(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=11, n=2, json_schema=ITEMS)
    static = run(generators["static"], PROMPTS[:3], **kwargs)
    continuous = run(generators["continuous"], PROMPTS[:3], **kwargs)
    assert [[o.text for o in r.outputs] for r in static] == [[o.text for o in r.outputs] for r in continuous]


def test_cut_by_length_says_so(generators):
    for gen in generators.values():
        result = run(gen, ["x"], max_new_tokens=3, temperature=0, json_schema=PERSON)[0]
        assert result.outputs[0].finish_reason == "length"
        with pytest.raises(ValueError):
            json.loads(result.answer)


@pytest.mark.parametrize("bad, what", [({"json_schema": {"type": "strange"}}, "JSON schema"),
                                       ({"regex": "(ab"}, "regex"), ({"grammar": "root ::= foo"}, "EBNF grammar")])
def test_uncompilable_constraint_is_a_clear_error_before_generation(generators, bad, what):
    gen = generators["continuous"]
    with pytest.raises(ValueError, match=rf"params\[1\]: XGrammar cannot compile this {what}"):
        gen.generate(["a", "b", "c"], params=[None, bad, None], max_new_tokens=4)  # raised before iterating
    results = run(gen, ["a", "b", "c"], params=[None, bad, None], max_new_tokens=4, on_error="record")
    assert results[1].error.startswith("params[1]: XGrammar cannot compile")
    assert results[0].error is None and results[2].error is None


def test_pydantic_model_class(generators):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        population: int

    assert SamplingParams(json_schema=City).json_schema == json.dumps(City.model_json_schema(),
                                                                      separators=(",", ":"))
    results = run(generators["continuous"], PROMPTS[:3], max_new_tokens=48, temperature=0, json_schema=City)
    for r in results:
        if r.outputs[0].finish_reason != "length":
            City.model_validate_json(r.answer)


def test_parameters_mapping_and_fingerprint(generators):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    params = SamplingParams.from_dict({"response_format": fmt}, "body", per_prompt=True)
    assert json.loads(params.json_schema) == PERSON
    assert SamplingParams.from_dict({"response_format": {"type": "json_object"}}, "body").json is True
    assert SamplingParams.from_dict({"response_format": {"type": "text"}}, "body").to_dict() == {}
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams.from_dict({"regex": "a", "choices": ["a"]}, "call")
    with pytest.raises(ValueError, match="record 3: pass either `response_format` or `json_schema`"):
        SamplingParams.from_dict({"response_format": fmt, "json_schema": PERSON}, "record 3")
    with pytest.raises(ValueError, match="`choices` must be a non-empty list"):
        SamplingParams.from_dict({"choices": "yes"}, "call")
    cells = SamplingParams.from_dict({"choices": '["a", "b"]', "json_schema": ""}, "f.csv:2", from_text=True)
    assert cells.choices == ("a", "b") and cells.json_schema is None
    # a prompt's constraint replaces the call's; json=False drops it
    assert SamplingParams(json=True).merge(SamplingParams(regex="a+")).to_dict() == {"regex": "a+"}
    assert SamplingParams(regex="a+").merge(SamplingParams(json=False)).to_dict() == {"json": False}
    # the constraint is in the fingerprint (stored answers are never served for another one), free ones unchanged
    gen = generators["static"]
    from simple_generation.params import ParamsBuilder

    builder = ParamsBuilder(gen.model.generation_config, gen.defaults, gen.tokenizer.pad_token_id, gen.tokenizer)
    free, schema, other, regex, off = builder.for_prompts(
        {"max_new_tokens": 8}, [None, {"json_schema": PERSON}, {"json_schema": ITEMS}, {"regex": "a"},
                                {"json": False}], 5)
    assert len({free.fingerprint, schema.fingerprint, other.fingerprint, regex.fingerprint}) == 4
    assert off.fingerprint == free.fingerprint and "\"constraint\":" not in free.fingerprint
    assert schema.batch_key == free.batch_key  # constrained and free rows share batches
    with pytest.raises(ValueError, match="beam search"):
        builder.for_prompts({"max_new_tokens": 8, "num_beams": 2}, [{"choices": ["a"]}], 1)


def test_file_records_and_openai_bodies(generators, tmp_path):
    from simple_generation.io.readers import read_records

    path = tmp_path / "in.jsonl"
    lines = [{"prompt": "a", "json_schema": PERSON, "id": 1},
             {"prompt": "b", "choices": ["red", "green"]},
             {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "c"}], "max_tokens": 40,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": ITEMS}}}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = list(read_records(path))
    assert json.loads(records[0].params["json_schema"]) == PERSON and records[0].fields == {"id": 1}
    assert records[1].params == {"choices": ["red", "green"]}
    assert json.loads(records[2].params["json_schema"]) == ITEMS
    results = run(generators["continuous"], ["a", "b"], params=[records[0].params, records[1].params],
                  max_new_tokens=64, temperature=0)
    check_json(results[0].outputs[0], PERSON)
    assert results[1].answer in ("red", "green")


def test_store_keys_separate_constraints(generators, tmp_path):
    store = str(tmp_path / "answers.sqlite")
    gen = generators["continuous"]
    first = run(gen, ["q"], max_new_tokens=6, temperature=0, choices=["yes", "no"], store=store)[0]
    again = run(gen, ["q"], max_new_tokens=6, temperature=0, choices=["yes", "no"], store=store)[0]
    other = run(gen, ["q"], max_new_tokens=6, temperature=0, choices=["maybe", "never"], store=store)[0]
    assert again.cached and again.answer == first.answer
    assert not other.cached and other.answer in ("maybe", "never")
