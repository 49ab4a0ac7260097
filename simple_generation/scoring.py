"""Scoring: the log-likelihood of given continuations (lm-evaluation-harness's ``loglikelihood``), and
multiple choice over them. Kept apart from the generation engines: one forward pass per pair, no decoding.

The path: the boundary (a context's trailing whitespace moves to the continuation) -> tokens (the whole string
is encoded once and cut after the context's tokens, so context + continuation are the whole string's tokens)
-> identical pairs once -> the store -> batches sorted by length, longest first (right padding: every row keeps
its own positions 0..n-1; an out-of-memory error halves the batch) -> log-softmax of the logits, in fp32, at the
continuation's positions -> back in input order.

Example:
    >>> from simple_generation import SimpleGenerator
    >>> gen = SimpleGenerator("gpt2")                                                  # doctest: +SKIP
    >>> gen.score(["The capital of France is"], [" Paris"])[0].logprob                 # doctest: +SKIP
    -1.93
    >>> gen.choose("The capital of France is", [" Paris", " Rome"]).best                # doctest: +SKIP
    0
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .scheduling import is_out_of_memory, release_memory, resolve_batch_size
from .store import ResultStore, StoredAnswer, answer_key

logger = logging.getLogger("simple_generation")

SCORE_FINGERPRINT = "score:v1"  # the store's "parameters" of a score (bump when what a score holds changes)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Score:
    """The log-likelihood of one continuation given its context.

    Attributes:
        logprob: the sum of the continuation tokens' log-probabilities (natural log).
        token_logprobs: one log-probability per continuation token.
        token_ids: the continuation's token ids (after the boundary: see :func:`encode_pair`).
        is_greedy: whether greedy decoding from the context would produce exactly these tokens.
        context_tokens: the context's token count (special tokens included).
        num_bytes: the continuation's length in UTF-8 bytes, as given (for per-byte normalisation).
        cached: the score came from the store.

    Example:
        >>> s = Score(-2.5, [-2.0, -0.5], [11, 12], True, 4, 6)
        >>> (s.num_tokens, s.per_token, round(s.per_byte, 3))
        (2, -1.25, -0.417)
    """

    logprob: float
    token_logprobs: list[float]
    token_ids: list[int]
    is_greedy: bool
    context_tokens: int
    num_bytes: int
    cached: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def per_token(self) -> float:
        """``logprob`` divided by the token count."""
        return self.logprob / max(1, self.num_tokens)

    @property
    def per_byte(self) -> float:
        """``logprob`` divided by the continuation's UTF-8 byte count (lm-evaluation-harness's ``acc_norm``
        divides by characters; bytes do not favour scripts of many bytes per character less)."""
        return self.logprob / max(1, self.num_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"logprob": self.logprob, "token_logprobs": list(self.token_logprobs),
                "token_ids": list(self.token_ids), "num_tokens": self.num_tokens, "is_greedy": self.is_greedy,
                "context_tokens": self.context_tokens, "num_bytes": self.num_bytes}


@dataclass
class Choice:
    """The options of one multiple-choice question, scored.

    Attributes:
        best: the option with the highest summed log-likelihood (``acc``).
        best_per_token: the highest log-likelihood per token.
        best_per_byte: the highest log-likelihood per UTF-8 byte (``acc_norm``).
        scores: one :class:`Score` per option, in the options' order.
        options: the options as given.

    Ties go to the first option (as ``argmax`` does).

    Example:
        >>> c = choose_from([Score(-3.0, [-3.0], [1], True, 2, 3), Score(-4.0, [-2.0, -2.0], [2, 3], False, 2, 8)],
        ...                 ["abc", "abcdefgh"])
        >>> (c.best, c.best_per_token, c.best_per_byte, c.answer)
        (0, 1, 1, 'abc')
    """

    best: int
    best_per_token: int
    best_per_byte: int
    scores: list[Score]
    options: list[str] = field(default_factory=list)

    @property
    def answer(self) -> str:
        """The option with the highest summed log-likelihood."""
        return self.options[self.best]

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_per_token": self.best_per_token, "best_per_byte": self.best_per_byte,
                "scores": [s.to_dict() for s in self.scores]}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choose_from(scores: Sequence[Score], options: Sequence[str]) -> Choice:
    """The :class:`Choice` of scored options (the best by sum, per token and per byte)."""
    scores = list(scores)
    return Choice(best=_argmax([s.logprob for s in scores]), best_per_token=_argmax([s.per_token for s in scores]),
                  best_per_byte=_argmax([s.per_byte for s in scores]), scores=scores, options=list(options))


# ------------------------------------------------------------------------------------------------ tokens
def split_boundary(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing whitespace moves to the front of the continuation (as lm-evaluation-harness
    does): ``("The capital is ", "Paris")`` -> ``("The capital is", " Paris")``.

    Example:
        >>> split_boundary("The capital is ", "Paris")
        ('The capital is', ' Paris')
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _special_suffix(ids: list[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[len(ids) - 1 - n] in special:
        n += 1
    return n


def encode_pair(tokenizer, context: str, continuation: str, is_encoder_decoder: bool = False
                ) -> tuple[list[int], list[int]]:
    """The token ids of (context, continuation), the boundary handled as lm-evaluation-harness does.

    Causal models: the whole string is encoded once (with the tokenizer's special tokens, e.g. Llama's BOS, as
    generation encodes prompts; none when the text already starts with the BOS token's text), the context
    alone too; the continuation is the whole string's tokens after the context's count, so context +
    continuation are exactly the whole string's tokens. A context of no tokens starts from BOS (else EOS).
    Encoder-decoders: the encoder gets the context (with special tokens), the decoder the continuation
    (without).
    """
    context, continuation = split_boundary(context, continuation)
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and context.startswith(bos))
    if is_encoder_decoder:
        context_ids = tokenizer(context, add_special_tokens=add_special)["input_ids"]
        return list(context_ids), list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=add_special)["input_ids"])
    context_ids = list(tokenizer(context, add_special_tokens=add_special)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    # a tokenizer that appends special tokens (an EOS) ends both encodings with them: not part of either side
    trailing = min(_special_suffix(whole, special), _special_suffix(context_ids, special))
    if trailing:
        whole, context_ids = whole[:-trailing], context_ids[:-trailing]
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("an empty context needs a BOS or EOS token to start from; this tokenizer has neither.")
        return [start], whole
    return whole[:len(context_ids)], whole[len(context_ids):]


# ------------------------------------------------------------------------------------------------ forward passes
@dataclass
class _Pair:
    context_ids: list[int]
    continuation_ids: list[int]


def _device_of(model) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _decoder_start(model) -> int:
    for config in (getattr(model, "generation_config", None), model.config):
        value = getattr(config, "decoder_start_token_id", None) if config is not None else None
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("this encoder-decoder has no decoder_start_token_id in its config: cannot score with it.")


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding (each row keeps its own positions 0..n-1, so no position ids are needed)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (positions as a 1-D tensor: transformers >= 4.50)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_batch(model, pairs: Sequence[_Pair], is_encoder_decoder: bool, pad_id: int
                  ) -> list[tuple[list[float], bool]]:
    """One forward pass over a batch of pairs: per pair, the continuation tokens' log-probabilities (fp32
    log-softmax of the logits) and whether each token is the argmax (all: ``is_greedy``)."""
    device = _device_of(model)
    with torch.inference_mode():
        if is_encoder_decoder:
            start = _decoder_start(model)
            encoder_ids, encoder_mask = _pad([p.context_ids for p in pairs], pad_id, device)
            decoder_ids, decoder_mask = _pad([[start] + p.continuation_ids[:-1] for p in pairs], pad_id, device)
            logits = model(input_ids=encoder_ids, attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                           decoder_attention_mask=decoder_mask).logits
            offsets = [0] * len(pairs)
        else:
            input_ids, mask = _pad([(p.context_ids + p.continuation_ids)[:-1] for p in pairs], pad_id, device)
            offsets = [len(p.context_ids) - 1 for p in pairs]
            if _keeps_logits(model):  # the lm head only at the positions any row's continuation is read from
                needed = sorted({q for p, o in zip(pairs, offsets) for q in range(o, o + len(p.continuation_ids))})
                logits = model(input_ids=input_ids, attention_mask=mask,
                               logits_to_keep=torch.tensor(needed, device=device)).logits
                column = {q: j for j, q in enumerate(needed)}  # a row's positions are consecutive: so are its columns
                offsets = [column[o] for o in offsets]
            else:
                logits = model(input_ids=input_ids, attention_mask=mask).logits
        results = []
        for row, (pair, offset) in enumerate(zip(pairs, offsets)):
            n = len(pair.continuation_ids)
            chosen = logits[row, offset:offset + n].float()
            logprobs = torch.log_softmax(chosen, dim=-1)
            target = torch.tensor(pair.continuation_ids, device=chosen.device).unsqueeze(-1)
            token_logprobs = logprobs.gather(-1, target).squeeze(-1)
            greedy = bool((chosen.argmax(dim=-1) == target.squeeze(-1)).all())
            results.append((token_logprobs.cpu().tolist(), greedy))
    return results


def run_pairs(model, pairs: Sequence[_Pair], *, is_encoder_decoder: bool, pad_id: int, batch_size: int,
              auto: bool, on_done: Callable[[int, list[float], bool], None] | None = None,
              progress: Any = None) -> list[tuple[list[float], bool]]:
    """Every pair's (token log-probabilities, is_greedy), in the given order; batches longest first; an
    out-of-memory error halves the batch (``auto``) and retries it. ``on_done(i, ...)`` is called per pair as
    its batch finishes (the store commits there)."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].context_ids) + len(pairs[i].continuation_ids)))
    results: list[tuple[list[float], bool] | None] = [None] * len(pairs)
    at, size = 0, max(1, batch_size)
    while at < len(order):
        chunk = order[at:at + size]
        try:
            done = forward_batch(model, [pairs[i] for i in chunk], is_encoder_decoder, pad_id)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not (auto and is_out_of_memory(err) and size > 1):
                raise
            release_memory()
            size = max(1, size // 2)
            logger.warning("Scoring: out of memory; batch size now %d.", size)
            continue
        for i, result in zip(chunk, done):
            results[i] = result
            if on_done is not None:
                on_done(i, *result)
        if progress is not None:
            progress.update(len(chunk))
        at += len(chunk)
    return results  # type: ignore[return-value]


def vllm_pairs(llm, pairs: Sequence[_Pair]) -> list[tuple[list[float], bool]]:
    """Every pair's (token log-probabilities, is_greedy) from vLLM: one prompt of context + continuation each,
    one new token, ``prompt_logprobs=1`` (vLLM's raw log-softmax of each prompt position, with the token's
    rank: rank 1 is the greedy choice)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p.context_ids + p.continuation_ids} for p in pairs], params,
                           use_tqdm=False)
    results = []
    for pair, output in zip(pairs, outputs):
        positions = list(output.prompt_logprobs or [])
        token_logprobs, greedy = [], True
        for j, token in enumerate(pair.continuation_ids):
            entry = (positions[len(pair.context_ids) + j] or {}).get(int(token))
            if entry is None:
                raise RuntimeError(f"vLLM returned no log-probability for continuation token {j} ({token}).")
            token_logprobs.append(float(entry.logprob))
            greedy = greedy and entry.rank == 1
        results.append((token_logprobs, greedy))
    return results


# ------------------------------------------------------------------------------------------------ the store
def score_key(model_identity: str, context: str, continuation: str) -> str:
    """The store key of one score: the model, the (boundary-split, formatted) pair, :data:`SCORE_FINGERPRINT`."""
    return answer_key(model_identity, _store_prompt(context, continuation), SCORE_FINGERPRINT, 0)


def _store_prompt(context: str, continuation: str) -> str:
    return "score\x00" + context + "\x00" + continuation


def score_to_stored(key: str, score: Score) -> StoredAnswer:
    """A score as a store row: ``texts`` holds one compact JSON (token log-probabilities, is_greedy, bytes)."""
    payload = json.dumps({"token_logprobs": score.token_logprobs, "is_greedy": score.is_greedy,
                          "num_bytes": score.num_bytes}, separators=(",", ":"))
    return StoredAnswer(key, [payload], [list(score.token_ids)], ["score"], score.context_tokens, score.num_tokens)


def score_from_stored(answer: StoredAnswer) -> Score | None:
    """The :class:`Score` of a store row (None when the row is not a score)."""
    try:
        payload = json.loads(answer.texts[0])
        token_logprobs = [float(x) for x in payload["token_logprobs"]]
        return Score(logprob=float(sum(token_logprobs)), token_logprobs=token_logprobs,
                     token_ids=list(answer.token_ids[0]), is_greedy=bool(payload["is_greedy"]),
                     context_tokens=int(answer.prompt_tokens), num_bytes=int(payload["num_bytes"]), cached=True)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ the call
def score_pairs(
    model,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    is_encoder_decoder: bool = False,
    context_length: int | None = None,
    format_context: Callable[[str], str] | None = None,
    model_identity: str | None = None,
    store: str | os.PathLike | ResultStore | None = None,
    batch_size: int | str = "auto",
    starting_batch_size: int | None = None,
    show_progress_bar: bool = False,
    engine: Any = None,
) -> list[Score]:
    """Score ``continuations[i]`` after ``contexts[i]``, for every ``i``; one :class:`Score` each, in input order.

    Everything is checked before any forward pass (types, empty continuations, lengths). ``format_context``
    turns a context into the text fed to the model (a template); ``store`` (with ``model_identity``) keeps
    each score as its batch finishes and returns stored ones (``cached=True``). With ``model=None`` and a vLLM
    ``engine``, vLLM scores the pairs (``prompt_logprobs``).
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: give one each.")
    texts: list[tuple[str, str]] = []
    for i, (context, continuation) in enumerate(zip(contexts, continuations)):
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TypeError(f"pair {i}: context and continuation must be strings, got "
                            f"{type(context).__name__} and {type(continuation).__name__}.")
        if not continuation:
            raise ValueError(f"pair {i}: the continuation is empty; there is nothing to score.")
        if format_context is not None:
            context = format_context(context)
        texts.append(split_boundary(context, continuation))
    unique = list(dict.fromkeys(texts))  # identical pairs once
    encoded = [_Pair(*encode_pair(tokenizer, c, k, is_encoder_decoder)) for c, k in unique]
    first = {}
    for i, pair_text in enumerate(texts):
        first.setdefault(pair_text, i)
    for (context, continuation), pair in zip(unique, encoded):
        where = f"pair {first[(context, continuation)]} (context {context[:40]!r})"
        if not pair.continuation_ids:
            raise ValueError(f"{where}: the continuation {continuation!r} has no tokens of its own.")
        if is_encoder_decoder and not pair.context_ids:
            raise ValueError(f"{where}: an encoder-decoder needs encoder input; the context has no tokens.")
        total = len(pair.continuation_ids) + (len(pair.context_ids) - 1 if not is_encoder_decoder else 0)
        if context_length is not None and max(total, len(pair.context_ids)) > context_length:
            raise ValueError(f"{where}: {len(pair.context_ids)} + {len(pair.continuation_ids)} tokens do not fit "
                             f"in the model's context of {context_length} tokens.")
    own_store = isinstance(store, (str, os.PathLike))
    store_obj = ResultStore(store) if own_store else store
    if store_obj is not None and model_identity is None:
        raise ValueError("a store needs the model's identity (model_identity=...).")
    try:
        scores: list[Score | None] = [None] * len(unique)
        keys = [score_key(model_identity, c, k) for c, k in unique] if store_obj is not None else []
        if store_obj is not None:
            found = store_obj.get_many(keys)
            for u, key in enumerate(keys):
                stored = score_from_stored(found[key]) if key in found else None
                if stored is not None and stored.token_ids == encoded[u].continuation_ids:
                    scores[u] = stored
        todo = [u for u in range(len(unique)) if scores[u] is None]

        def finish(position: int, token_logprobs: list[float], greedy: bool) -> None:
            u = todo[position]
            pair = encoded[u]
            score = Score(logprob=float(sum(token_logprobs)), token_logprobs=token_logprobs,
                          token_ids=list(pair.continuation_ids), is_greedy=greedy,
                          context_tokens=len(pair.context_ids), num_bytes=len(unique[u][1].encode("utf-8")))
            scores[u] = score
            if store_obj is not None:
                store_obj.put(score_to_stored(keys[u], score), model_identity, _store_prompt(*unique[u]),
                              SCORE_FINGERPRINT)

        if todo and model is None:
            llm = getattr(engine, "llm", None) if getattr(engine, "name", None) == "vllm" else None
            if llm is None:
                raise ValueError("scoring runs on the HuggingFace model or vLLM; this generator was loaded with "
                                 f"the {getattr(engine, 'name', 'unknown')} engine: load it with engine='auto', "
                                 "'static' or 'vllm'.")
            if is_encoder_decoder:
                raise ValueError("vLLM scores decoder-only models here.")
            for position, (token_logprobs, greedy) in enumerate(vllm_pairs(llm, [encoded[u] for u in todo])):
                finish(position, token_logprobs, greedy)
        elif todo:
            on_cpu = str(_device_of(model)).startswith("cpu")
            size, auto = resolve_batch_size(batch_size, starting_batch_size, len(todo), on_cpu)
            pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
            from tqdm.auto import tqdm

            with tqdm(total=len(todo), desc="Scoring", unit="pair", disable=not show_progress_bar) as progress:
                run_pairs(model, [encoded[u] for u in todo], is_encoder_decoder=is_encoder_decoder, pad_id=pad_id,
                          batch_size=size, auto=auto, on_done=finish, progress=progress)
    finally:
        if own_store and store_obj is not None:
            store_obj.close()
    position = {pair: u for u, pair in enumerate(unique)}
    out: list[Score] = []
    seen: set[int] = set()
    for pair_text in texts:  # a repeated pair gets its own copy of the one score
        u = position[pair_text]
        score = scores[u]
        out.append(score if u not in seen else dataclasses.replace(
            score, token_logprobs=list(score.token_logprobs), token_ids=list(score.token_ids)))
        seen.add(u)
    return out
