"""Scoring (gen.score / gen.choose / simple-generation score): equal to a direct unbatched forward pass of HF's
own model (fp32, 1e-4), the lm-evaluation-harness tokenization boundary, greedy flags, batching, order, dedup,
the store and the CLI. Tiny real checkpoints only."""

import json

import pytest
import torch

from simple_generation import SimpleGenerator, scoring
from simple_generation.scoring import Score, choose_from, encode_pair, split_boundary

from .reference import load_reference

CONTEXTS = ["The quick brown fox jumps over the lazy", "Tell me what is two plus two?", "Hello", "Numbers: 0 1 2",
            "Once upon a time there was a small model that learned to answer questions politely and"]
CONTINUATIONS = [" dog.", " Two plus two is four.", " world", " 3 4 5 6", " briefly."]


def _generator(path, **kwargs):
    return SimpleGenerator(path, track_emissions=False, dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def llama(llama_path):
    return _generator(llama_path)


def reference_score(model, tokenizer, context, continuation):
    """One unpadded forward pass of HF's model: (token log-probs, is_greedy), tokens encoded independently."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            encoder = tokenizer(context, return_tensors="pt")["input_ids"]
            target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            start = model.config.decoder_start_token_id
            logits = model(input_ids=encoder, decoder_input_ids=torch.tensor([[start] + target[:-1]])).logits[0]
        else:
            whole = tokenizer(context + continuation)["input_ids"]
            n_context = len(tokenizer(context)["input_ids"])
            target = whole[n_context:]
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, n_context - 1:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_logprobs = [logprobs[j, t].item() for j, t in enumerate(target)]
        greedy = all(logits[j].argmax().item() == t for j, t in enumerate(target))
    return target, token_logprobs, greedy


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_scores_equal_an_unbatched_forward_pass(arch, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    gen = _generator(path)
    model, tokenizer = load_reference(path)
    scores = gen.score(CONTEXTS, CONTINUATIONS, batch_size=3)  # padded batches of different lengths
    for context, continuation, score in zip(CONTEXTS, CONTINUATIONS, scores):
        target, token_logprobs, greedy = reference_score(model, tokenizer, context, continuation)
        assert score.token_ids == target
        assert score.num_tokens == len(target)
        # 1e-4 absolute; relative 1e-6 for the tiny random T5, whose log-probs are about -200 (1e-4 is 7 fp32
        # ulps there: HF's own batch of two identical unpadded rows already differs from its batch of one by 6e-5)
        assert score.token_logprobs == pytest.approx(token_logprobs, abs=1e-4, rel=1e-6)
        assert score.logprob == pytest.approx(sum(token_logprobs), abs=1e-4, rel=1e-6)
        assert score.is_greedy == greedy


def test_a_tokenizer_without_pad_token_scores_the_same(gpt2_path):
    gen = _generator(gpt2_path)
    padded = gen.score(CONTEXTS, CONTINUATIONS, batch_size=5)
    gen.tokenizer.pad_token = None  # pads with EOS (any id: padded positions are masked and never read)
    assert gen.tokenizer.pad_token_id is None
    unpadded = gen.score(CONTEXTS, CONTINUATIONS, batch_size=5)
    for a, b in zip(padded, unpadded):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_trailing_whitespace_of_the_context_moves_to_the_continuation(llama):
    assert split_boundary("The capital is ", "Paris") == ("The capital is", " Paris")
    a, b = llama.score(["The capital is", "The capital is "], [" Paris", "Paris"])
    assert a.token_ids == b.token_ids and a.context_tokens == b.context_tokens
    assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
    # context + continuation are exactly the whole string's tokens
    context_ids, continuation_ids = encode_pair(llama.tokenizer, "The capital is ", "Paris")
    assert context_ids + continuation_ids == llama.tokenizer("The capital is Paris")["input_ids"]


def test_is_greedy_for_what_greedy_decoding_produced(llama):
    results = llama.generate(CONTEXTS, max_new_tokens=6, temperature=0, skip_prompt=True)
    checked = 0
    for prompt, result in zip(CONTEXTS, results):
        generated = list(result.token_ids[0] if result.token_ids and isinstance(result.token_ids[0], list)
                         else result.token_ids)
        for n in range(len(generated), 0, -1):  # the longest prefix whose text re-encodes to the same tokens
            answer = llama.tokenizer.decode(generated[:n], skip_special_tokens=True)
            if answer and encode_pair(llama.tokenizer, prompt, answer)[1] == generated[:n]:
                break
        else:
            continue
        wrong = answer[:-1] + ("a" if answer[-1] != "a" else "b")
        greedy, other = llama.score([prompt, prompt], [answer, wrong])
        assert greedy.is_greedy and not other.is_greedy
        assert greedy.token_ids == generated[:n]
        checked += 1
    assert checked >= 3


def test_batch_size_order_and_duplicates(llama, monkeypatch):
    contexts = CONTEXTS + CONTEXTS[:2]
    continuations = CONTINUATIONS + CONTINUATIONS[:2]
    one = llama.score(contexts, continuations, batch_size=1)
    seen = []
    real = scoring.forward_batch
    monkeypatch.setattr(scoring, "forward_batch", lambda model, pairs, *a: seen.append(len(pairs)) or
                        real(model, pairs, *a))
    many = llama.score(contexts, continuations, batch_size=4)
    assert sum(seen) == len(CONTEXTS) and seen == [4, 1]  # duplicates scored once, in batches of 4
    for a, b in zip(one, many):
        assert a.token_ids == b.token_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert many[5].token_logprobs == many[0].token_logprobs and many[5] is not many[0]
    # longest first
    lengths = [s.context_tokens + s.num_tokens for s in many[:len(CONTEXTS)]]
    seen.clear()
    order = []
    monkeypatch.setattr(scoring, "forward_batch", lambda model, pairs, *a: order.extend(
        len(p.context_ids) + len(p.continuation_ids) for p in pairs) or real(model, pairs, *a))
    llama.score(CONTEXTS, CONTINUATIONS, batch_size=2)
    assert order == sorted(lengths, reverse=True)


def test_out_of_memory_halves_the_batch(llama, monkeypatch):
    expected = llama.score(CONTEXTS, CONTINUATIONS, batch_size=1)
    real = scoring.forward_batch
    sizes = []

    def tight(model, pairs, *args):
        sizes.append(len(pairs))
        if len(pairs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(model, pairs, *args)

    monkeypatch.setattr(scoring, "forward_batch", tight)
    got = llama.score(CONTEXTS, CONTINUATIONS, batch_size="auto", starting_batch_size=8)
    assert sizes[:3] == [5, 2, 2]
    for a, b in zip(expected, got):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_choose_picks_the_best_by_each_criterion(llama):
    options = [" dog.", " cat", " lazy dog sleeping in the sun", "x"]
    choice = llama.choose(CONTEXTS[0], options)
    scores = llama.score(CONTEXTS[0], options)
    sums, per_token = [s.logprob for s in scores], [s.logprob / s.num_tokens for s in scores]
    per_byte = [s.logprob / len(o.encode()) for s, o in zip(scores, options)]
    assert choice.best == sums.index(max(sums))
    assert choice.best_per_token == per_token.index(max(per_token))
    assert choice.best_per_byte == per_byte.index(max(per_byte))
    assert choice.answer == options[choice.best] and len(choice.scores) == 4
    batched = llama.choose([CONTEXTS[0], CONTEXTS[2]], [options, [" world", " there"]])
    assert batched[0].best == choice.best and len(batched[1].scores) == 2
    assert [s.logprob for s in batched[0].scores] == pytest.approx(sums, abs=1e-4)


def test_choose_from_ties_go_to_the_first_option():
    tied = [Score(-1.0, [-1.0], [5], True, 2, 2), Score(-1.0, [-1.0], [6], False, 2, 2)]
    assert choose_from(tied, ["a", "b"]).best == 0


def test_bad_inputs_fail_before_any_forward_pass(llama):
    with pytest.raises(ValueError, match="pair 1: the continuation is empty"):
        llama.score(["a", "b"], [" x", ""])
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        llama.score(["a", "b"], [" x"])
    with pytest.raises(TypeError, match=r"options\[0\]"):
        llama.choose("a", [])


def test_scores_are_stored_and_read_back(llama, tmp_path, monkeypatch):
    store = tmp_path / "scores.sqlite"
    first = llama.score(CONTEXTS, CONTINUATIONS, store=store)
    assert not any(s.cached for s in first)
    calls = []
    monkeypatch.setattr(scoring, "forward_batch", lambda *a: calls.append(1))
    again = llama.score(CONTEXTS, CONTINUATIONS, store=str(store))
    assert calls == [] and all(s.cached for s in again)
    for a, b in zip(first, again):
        assert (a.token_ids, a.is_greedy, a.context_tokens, a.num_bytes) == (b.token_ids, b.is_greedy,
                                                                             b.context_tokens, b.num_bytes)
        assert a.token_logprobs == b.token_logprobs and a.logprob == pytest.approx(b.logprob, abs=1e-9)


def test_apply_template_scores_the_formatted_context(llama_path):
    gen = _generator(llama_path, system_prompt="vicuna_v1.1")
    raw = gen.score("Hi", " there")
    templated = gen.score("Hi", " there", apply_template=True)
    assert templated.context_tokens > raw.context_tokens


def test_cli_score_round_trip(llama, llama_path, tmp_path, monkeypatch):
    from simple_generation.cli import main

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = [{"id": "q1", "context": CONTEXTS[0], "continuation": CONTINUATIONS[0]},
               {"prompt": CONTEXTS[2], "choices": [" world", " there", "!"]}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["score", llama_path, "--input", str(source), "--output", str(out), "--no-emissions", "--quiet",
                 "--dtype", "float32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[0]["id"] == "q1"
    expected = llama.score(CONTEXTS[0], CONTINUATIONS[0])
    assert rows[0]["logprob"] == pytest.approx(expected.logprob, abs=1e-4)
    assert rows[0]["token_ids"] == expected.token_ids and rows[0]["is_greedy"] == expected.is_greedy
    choice = llama.choose(CONTEXTS[2], [" world", " there", "!"])
    assert (rows[1]["best"], rows[1]["best_per_token"], rows[1]["best_per_byte"]) == \
        (choice.best, choice.best_per_token, choice.best_per_byte)
    assert len(rows[1]["scores"]) == 3
    # the store (<output>.sqlite): a rerun reads every score back, no forward pass
    monkeypatch.setattr(scoring, "forward_batch", lambda *a: pytest.fail("scored again"))
    first = out.read_text()
    assert main(["score", llama_path, "--input", str(source), "--output", str(out), "--no-emissions", "--quiet",
                 "--dtype", "float32"]) == 0
    assert out.read_text() == first


def test_cli_score_bad_record_is_a_usage_error(tmp_path, capsys):
    from simple_generation.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"question": "no fields we know"}) + "\n")
    assert main(["score", "gpt2", "--input", str(source)]) == 2  # nothing loaded: a hub id is never fetched
    assert "needs context and continuation, or prompt and choices" in capsys.readouterr().err
    source.write_text(json.dumps({"context": "a", "continuation": ""}) + "\n")
    assert main(["score", "gpt2", "--input", str(source)]) == 2
    assert "continuation" in capsys.readouterr().err


def test_cli_score_usage_errors_load_no_torch(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "a", "choices": "not a list"}) + "\n")
    code = ("import sys; from simple_generation.cli import main; code = main(['score', 'gpt2', '--input', "
            f"{str(source)!r}]); print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "choices a non-empty list" in done.stderr


def test_full_logits_and_kept_logits_agree(llama, monkeypatch):
    kept = llama.score(CONTEXTS, CONTINUATIONS, batch_size=5)  # the lm head at the continuations' positions only
    monkeypatch.setattr(scoring, "_keeps_logits", lambda model: False)
    full = llama.score(CONTEXTS, CONTINUATIONS, batch_size=5)
    for a, b in zip(kept, full):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4) and a.is_greedy == b.is_greedy


@pytest.mark.slow
def test_vllm_scores_equal_the_hf_ones(tmp_path_factory):
    """vLLM (prompt_logprobs) on a tiny Llama of head size 64 (vLLM's CPU attention): the HF engine's scores."""
    pytest.importorskip("vllm")
    from simple_generation.tiny import build_tiny_checkpoint

    path = str(build_tiny_checkpoint(tmp_path_factory.mktemp("vllm") / "llama64", "llama", hidden=128, heads=2))
    hf = _generator(path).score(CONTEXTS, CONTINUATIONS)
    gen = SimpleGenerator(path, track_emissions=False, dtype=torch.float32, engine="vllm", max_model_len=256)
    got = gen.score(CONTEXTS, CONTINUATIONS)
    for a, b in zip(hf, got):
        assert a.token_ids == b.token_ids and a.is_greedy == b.is_greedy
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4, rel=1e-6)
    options = [" dog.", " cat"]
    assert gen.choose(CONTEXTS[0], options).best == _generator(path).choose(CONTEXTS[0], options).best
