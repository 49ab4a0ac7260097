"""Logprobs (``logprobs=k``, ``prompt_logprobs=k``): equal to HF's own unbatched numbers (log-softmax of the raw
logits of ``generate(..., output_logits=True)``, and of a direct forward pass over the prompt) within 1e-4 in
fp32, on the static engine at several batch sizes and on the continuous engine; trimmed with the tokens; stored
and returned on resume; never served from an answer stored without them; written by the CLI (JSONL and OpenAI
Batch shapes). Tiny real models, CPU."""

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from simple_generation import SimpleGenerator
from simple_generation.cli import main
from simple_generation.io.writers import openai_batch_line
from simple_generation.sampling_params import SamplingParams

from .conftest import PROMPTS
from .reference import load_reference

TOL = 1e-4
QUIET = dict(show_progress_bar=False)


@pytest.fixture(scope="module")
def reference(llama_path):
    return load_reference(llama_path)


@pytest.fixture(scope="module")
def generators(llama_path):
    return {engine: SimpleGenerator(llama_path, device="cpu", engine=engine, track_emissions=False)
            for engine in ("static", "continuous")}


def hf_logprobs(model, tokenizer, prompt, max_new_tokens):
    """HF's unbatched greedy generate: (new token ids, their log-probabilities, the log-softmax of each step)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    steps = [torch.log_softmax(logits[0].float(), dim=-1) for logits in out.logits]
    start = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]  # the decoder start token
    new = out.sequences[0, start:].tolist()
    return new, [step[token].item() for step, token in zip(steps, new)], steps


def hf_prompt_logprobs(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    tokens = ids[0].tolist()
    return tokens, [logprobs[t - 1, tokens[t]].item() for t in range(1, len(tokens))], logprobs


@pytest.mark.parametrize("engine, batch_size", [("static", 1), ("static", 3), ("continuous", 3)])
def test_greedy_logprobs_equal_hf_unbatched(generators, reference, engine, batch_size):
    model, tokenizer = reference
    prompts = PROMPTS[:3]  # different lengths: the batch of 3 is padded
    results = generators[engine].generate(prompts, max_new_tokens=8, temperature=0, logprobs=3,
                                          batch_size=batch_size, skip_prompt=True, **QUIET)
    for prompt, result in zip(prompts, results):
        new, values, steps = hf_logprobs(model, tokenizer, prompt, 8)
        output = result.outputs[0]
        assert output.token_ids == new[:len(output.token_ids)]
        assert [entry.token_id for entry in output.logprobs] == output.token_ids
        for t, entry in enumerate(output.logprobs):
            assert abs(entry.logprob - values[t]) < TOL
            top_values, top_ids = steps[t].topk(3)
            assert [top.token_id for top in entry.top] == top_ids.tolist()
            assert max(abs(a.logprob - b) for a, b in zip(entry.top, top_values.tolist())) < TOL
            assert entry.token == tokenizer.decode([entry.token_id])


def test_encoder_decoder_logprobs_equal_hf_unbatched(t5_path):
    model, tokenizer = load_reference(t5_path)
    gen = SimpleGenerator(t5_path, device="cpu", engine="static", track_emissions=False)
    results = gen.generate(PROMPTS[:3], max_new_tokens=6, temperature=0, logprobs=2, batch_size=3, **QUIET)
    for prompt, result in zip(PROMPTS[:3], results):
        new, values, _ = hf_logprobs(model, tokenizer, prompt, 6)
        output = result.outputs[0]
        assert output.token_ids == new[:len(output.token_ids)] and len(output.logprobs) == len(output.token_ids)
        assert max(abs(e.logprob - v) for e, v in zip(output.logprobs, values)) < TOL
    with pytest.raises(ValueError, match="prompt_logprobs needs a causal"):
        gen.generate(PROMPTS[:1], max_new_tokens=2, prompt_logprobs=0, **QUIET)


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_prompt_logprobs_equal_a_direct_forward(generators, reference, engine):
    model, tokenizer = reference
    prompts = PROMPTS[:2]
    results = generators[engine].generate(prompts, max_new_tokens=2, temperature=0, prompt_logprobs=2,
                                          batch_size=2, **QUIET)
    for prompt, result in zip(prompts, results):
        tokens, values, logprobs = hf_prompt_logprobs(model, tokenizer, prompt)
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(tokens)
        assert [e.token_id for e in result.prompt_logprobs[1:]] == tokens[1:]
        assert max(abs(e.logprob - v) for e, v in zip(result.prompt_logprobs[1:], values)) < TOL
        assert [[t.token_id for t in e.top] for e in result.prompt_logprobs[1:]] == \
            [logprobs[t - 1].topk(2).indices.tolist() for t in range(1, len(tokens))]
        assert result.outputs[0].logprobs is None  # not asked


def test_top_k_is_sorted_and_holds_the_chosen_token_when_it_is_in_it(generators):
    results = generators["continuous"].generate(PROMPTS[:3], max_new_tokens=6, temperature=0.9, seed=3,
                                                num_return_sequences=2, logprobs=5, **QUIET)
    for result in results:
        for output in result.outputs:
            assert len(output.logprobs) == len(output.token_ids)
            for entry in output.logprobs:
                values = [top.logprob for top in entry.top]
                assert len(values) == 5 and values == sorted(values, reverse=True)
                assert entry.logprob <= values[0] + 1e-6
                if entry.logprob >= values[-1] + 1e-6:  # among the top k: it is listed, with its own value
                    listed = {top.token_id: top.logprob for top in entry.top}
                    assert abs(listed[entry.token_id] - entry.logprob) < 1e-6


def test_logprobs_zero_gives_the_chosen_token_only(generators):
    output = generators["static"].generate(PROMPTS[:1], max_new_tokens=4, temperature=0, logprobs=0,
                                           **QUIET)[0].outputs[0]
    assert len(output.logprobs) == len(output.token_ids) and all(entry.top == [] for entry in output.logprobs)


def test_sampled_logprobs_agree_between_engines(generators):
    """Seeded sampling draws the same tokens on both HF engines; the logprobs are the raw ones, before the
    temperature, and agree too (padded rows of the static batch trimmed with their tokens)."""
    kwargs = dict(max_new_tokens=6, temperature=1.5, seed=11, num_return_sequences=2, logprobs=2, **QUIET)
    static = generators["static"].generate(PROMPTS[:3], batch_size=3, **kwargs)
    continuous = generators["continuous"].generate(PROMPTS[:3], **kwargs)
    for a, b in zip(static, continuous):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and len(x.logprobs) == len(x.token_ids)
            assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) < TOL


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_stop_strings_and_eos_trim_logprobs_with_the_tokens(generators, engine):
    gen = generators[engine]
    free = gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0, logprobs=1, skip_prompt=True,
                        **QUIET)[0].outputs[0]
    tokenizer = gen.tokenizer
    # a stop string: the text of a later token of plain letters, found once in the answer
    stop = next(text for text in (tokenizer.decode([t]).strip() for t in free.token_ids[3:-1])
                if len(text) >= 2 and text.isascii() and text.isalpha() and free.text.count(text) == 1)
    cut = gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0, logprobs=1, skip_prompt=True, stop=stop,
                       **QUIET)[0].outputs[0]
    assert cut.finish_reason == "stop_string" and len(cut.token_ids) < len(free.token_ids)
    assert len(cut.logprobs) == len(cut.token_ids)
    assert [e.logprob for e in cut.logprobs] == pytest.approx([e.logprob for e in free.logprobs[:len(cut.token_ids)]],
                                                              abs=TOL)
    # an EOS: the third token made an end-of-sequence id
    eos = gen.generate(PROMPTS[:1], max_new_tokens=12, temperature=0, logprobs=1, skip_prompt=True,
                       eos_token_id=free.token_ids[2], **QUIET)[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.token_ids == free.token_ids[:3]
    assert [e.token_id for e in eos.logprobs] == eos.token_ids


def test_per_prompt_logprobs_share_one_batch(generators):
    gen = generators["static"]
    results = gen.generate(PROMPTS[:3], max_new_tokens=4, temperature=0, batch_size=3,
                           params=[{"logprobs": 2}, None, {"prompt_logprobs": 1}], **QUIET)
    assert gen.last_run.batches == 1
    assert results[0].outputs[0].logprobs is not None and results[0].prompt_logprobs is None
    assert results[1].outputs[0].logprobs is None and results[1].prompt_logprobs is None
    assert results[2].outputs[0].logprobs is None and results[2].prompt_logprobs is not None


def test_store_returns_logprobs_on_resume_and_keeps_them_apart(generators, tmp_path):
    gen = generators["continuous"]
    store = tmp_path / "run.sqlite"
    plain = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, store=store, **QUIET)
    asked = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, store=store, logprobs=2, prompt_logprobs=1,
                         **QUIET)
    assert not any(r.cached for r in asked)  # an answer stored without logprobs is not served for them
    assert all(r.outputs[0].logprobs is not None and r.prompt_logprobs is not None for r in asked)
    again = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, store=store, logprobs=2, prompt_logprobs=1,
                         **QUIET)
    assert all(r.cached for r in again)
    for a, b in zip(asked, again):
        assert a.outputs == b.outputs and a.prompt_logprobs == b.prompt_logprobs  # float32 stored exactly
    other_k = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, store=store, logprobs=1, **QUIET)
    assert not any(r.cached for r in other_k) and len(other_k[0].outputs[0].logprobs[0].top) == 1
    plain_again = gen.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, store=store, **QUIET)
    assert all(r.cached and r.outputs[0].logprobs is None for r in plain_again)
    assert [r.text for r in plain_again] == [r.text for r in plain]
    db = sqlite3.connect(store)
    blobs = [row[0] for row in db.execute("SELECT logprobs FROM results")]
    db.close()
    assert sum(blob is None for blob in blobs) == 2 and all(isinstance(b, bytes) for b in blobs if b is not None)


def test_beam_search_with_logprobs_is_refused_before_generation(generators):
    with pytest.raises(ValueError, match="logprobs with beam search"):
        generators["static"].generate(PROMPTS[:1], max_new_tokens=4, num_beams=2, logprobs=1, **QUIET)


def test_openvino_routes_logprobs_elsewhere():
    from simple_generation.engines.openvino import OpenVINOEngine

    class Params:  # what unsupported_params reads of GenerationParams
        logprobs, prompt_logprobs = 0, None

    assert "does not return logprobs" in OpenVINOEngine.unsupported_params(Params())


def test_openai_and_vllm_spellings_map_onto_logprobs():
    assert SamplingParams.from_dict({"logprobs": True, "top_logprobs": 3}).logprobs == 3
    assert SamplingParams.from_dict({"logprobs": True}, per_prompt=True).logprobs == 0
    assert SamplingParams.from_dict({"logprobs": False}).logprobs is None
    assert SamplingParams.from_dict({"logprobs": 4, "prompt_logprobs": 0}, per_prompt=True).prompt_logprobs == 0
    assert SamplingParams.from_dict({"logprobs": "true", "top_logprobs": "2"}, "f.csv:2", from_text=True,
                                    per_prompt=True).logprobs == 2
    with pytest.raises(ValueError, match="`top_logprobs` needs `logprobs: true`"):
        SamplingParams.from_dict({"top_logprobs": 2}, per_prompt=True)
    with pytest.raises(ValueError, match="`logprobs` must be >= 0"):
        SamplingParams.from_dict({"logprobs": -1})


def test_openai_batch_line_has_openai_logprobs_shape():
    entries = [{"token_id": 5, "token": " Hi", "logprob": -0.25,
                "top_logprobs": [{"token_id": 5, "token": " Hi", "logprob": -0.25},
                                 {"token_id": 7, "token": "\ufffd", "logprob": -2.0}]}]
    record = {"index": 0, "custom_id": "r1", "answer": " Hi", "finish_reason": "length", "prompt_tokens": 3,
              "completion_tokens": 1, "error": None, "logprobs": entries}
    choice = openai_batch_line(record, created=0)["response"]["body"]["choices"][0]
    assert choice["logprobs"] == {"content": [{"token": " Hi", "logprob": -0.25, "bytes": [32, 72, 105],
                                               "top_logprobs": [{"token": " Hi", "logprob": -0.25,
                                                                 "bytes": [32, 72, 105]},
                                                                {"token": "\ufffd", "logprob": -2.0, "bytes": None}]}],
                                  "refusal": None}
    legacy = openai_batch_line(record, chat=False, created=0)["response"]["body"]["choices"][0]["logprobs"]
    assert legacy == {"tokens": [" Hi"], "token_logprobs": [-0.25], "top_logprobs": [{" Hi": -0.25, "\ufffd": -2.0}],
                      "text_offset": [0]}
    no_logprobs = openai_batch_line({**record, "logprobs": None}, created=0)
    assert no_logprobs["response"]["body"]["choices"][0]["logprobs"] is None


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def test_cli_logprobs_jsonl_and_openai_batch(llama_path, tmp_path, reference):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2])
                      + json.dumps({"prompt": PROMPTS[2], "logprobs": 0}) + "\n", encoding="utf-8")
    common = ["--max-new-tokens", "4", "--temperature", "0", "--skip-prompt", "--quiet", "--no-emissions"]
    assert main([llama_path, "--input", str(source), "--output", str(tmp_path / "plain.jsonl"), *common]) == 0
    plain = _jsonl(tmp_path / "plain.jsonl")
    assert "logprobs" not in plain[0] and "logprobs" in plain[2]  # only the record that asked
    assert main([llama_path, "--input", str(source), "--output", str(tmp_path / "lp.jsonl"), "--logprobs", "2",
                 *common]) == 0
    records = _jsonl(tmp_path / "lp.jsonl")
    model, tokenizer = reference
    new, values, _ = hf_logprobs(model, tokenizer, PROMPTS[0], 4)
    first = records[0]["logprobs"]
    assert [e["token_id"] for e in first] == new[:len(first)]
    assert max(abs(e["logprob"] - v) for e, v in zip(first, values)) < TOL
    assert all(len(e["top_logprobs"]) == 2 for e in first) and records[2]["logprobs"][0]["top_logprobs"] == []
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": PROMPTS[0]}],
                                          "logprobs": True, "top_logprobs": 2, "max_tokens": 3}}) + "\n",
                     encoding="utf-8")
    assert main([llama_path, "--input", str(batch), "--output", str(tmp_path / "out.jsonl"), "--output-format",
                 "openai-batch", *common]) == 0
    line = _jsonl(tmp_path / "out.jsonl")[0]
    content = line["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == line["response"]["body"]["usage"]["completion_tokens"]
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 2
               for e in content)
