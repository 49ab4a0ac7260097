"""Structured output: answers constrained to a JSON schema, any JSON, a regex, a list of choices or a grammar.

One grammar library under every engine, `XGrammar <https://github.com/mlc-ai/xgrammar>`_ (what vLLM and SGLang
default to and what OpenVINO GenAI's ``StructuredOutputConfig`` runs): each constraint is compiled once per
(tokenizer, vocabulary size, constraint) and each constrained sequence gets its own ``GrammarMatcher``. At every
step the matcher's token bitmask is applied to that row's logits *after* the other logits processors (repetition
penalty, ``min_new_tokens``...) and before the argmax or the sampler (as vLLM does); the chosen token is then fed
to the matcher. Once the grammar is complete only the end-of-sequence tokens are allowed, so a constrained answer
ends with ``finish_reason="stop"``; an answer that runs out of ``max_new_tokens`` first ends with
``finish_reason="length"`` and is incomplete (it may not parse).

XGrammar and jsonschema are an optional extra: ``pip install "simple-generation[structured]"``.

Example:
    >>> from simple_generation.sampling_params import SamplingParams
    >>> constraint_of(SamplingParams(choices=("yes", "no")))
    Constraint(kind='choices', value='["yes","no"]')
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = 'structured output needs XGrammar: pip install "simple-generation[structured]" (xgrammar>=0.2)'


@dataclass(frozen=True)
class Constraint:
    """One prompt's constraint: ``kind`` (a ``CONSTRAINT_FIELDS`` name) and its canonical ``value`` text
    (the schema as canonical JSON, ``""`` for any JSON, the regex, the choices as a JSON list, the grammar)."""

    kind: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.value}"

    def fingerprint(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}

    @property
    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choices" else []

    @property
    def schema(self) -> dict | None:
        return json.loads(self.value) if self.kind == "json_schema" else None


def constraint_of(params: Any) -> Constraint | None:
    """The constraint a :class:`~simple_generation.sampling_params.SamplingParams` sets (None: free text)."""
    if getattr(params, "json_schema", None) is not None:
        return Constraint("json_schema", params.json_schema)
    if getattr(params, "json", None):
        return Constraint("json", "")
    if getattr(params, "regex", None) is not None:
        return Constraint("regex", params.regex)
    if getattr(params, "choices", None) is not None:
        return Constraint("choices", json.dumps(list(params.choices), ensure_ascii=False, separators=(",", ":")))
    if getattr(params, "grammar", None) is not None:
        return Constraint("grammar", params.grammar)
    return None


def xgrammar_missing() -> str | None:
    """Why the HF engines cannot constrain answers here (XGrammar is not installed), or None."""
    import importlib.util

    return None if importlib.util.find_spec("xgrammar") is not None else INSTALL_HINT


def _xgrammar():
    try:
        import xgrammar
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return xgrammar


def choices_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose strings are exactly ``choices``."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def model_vocab_size(config: Any) -> int | None:
    """The width of a model's logits (its text config's ``vocab_size``), or None when unknown."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if size else None


_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'            # [^\"\\\r\n] in XGrammar's EBNF
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'  # [^\0-\x1f\"\\\r\n]


class _Compiler:
    def __init__(self, tokenizer: Any, vocab_size: int | None):
        xgr = _xgrammar()
        size = max(vocab_size or 0, len(tokenizer))
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size)
        self.vocab_size = size
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=4)
        self.compiled: dict[str, Any] = {}
        self.lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Any:
        with self.lock:
            found = self.compiled.get(constraint.key)
            if found is None:
                found = self._compile(constraint)
                self.compiled[constraint.key] = found
            return found

    def _compile(self, constraint: Constraint) -> Any:
        kind, value = constraint.kind, constraint.value
        if kind == "json_schema":
            xgr = _xgrammar()
            grammar = xgr.Grammar.from_json_schema(value, any_whitespace=False, strict_mode=True)
            text = str(grammar)
            # XGrammar 0.2's strings with maxLength/minLength allow raw control characters, which JSON forbids
            # (json.loads refuses them): give them the character class of its other strings
            fixed = text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
            return self.compiler.compile_grammar(fixed if fixed != text else grammar)
        if kind == "json":
            return self.compiler.compile_builtin_json_grammar()
        if kind == "regex":
            return self.compiler.compile_regex(value)
        if kind == "choices":
            return self.compiler.compile_grammar(choices_grammar(constraint.choices))
        if kind == "grammar":
            return self.compiler.compile_grammar(value)
        raise ValueError(f"unknown constraint kind {kind!r}")


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def _compiler(tokenizer: Any, vocab_size: int | None) -> _Compiler:
    with _COMPILERS_LOCK:
        per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
        compiler = per_tokenizer.get(vocab_size)
        if compiler is None:
            compiler = per_tokenizer[vocab_size] = _Compiler(tokenizer, vocab_size)
        return compiler


def compile_constraint(constraint: Constraint, tokenizer: Any, vocab_size: int | None) -> Any:
    """The compiled grammar of ``constraint`` for this tokenizer and logits width (cached); a ``ValueError``
    saying why when XGrammar cannot compile it (``ImportError`` when XGrammar is missing).

    Example:
        >>> compiled = compile_constraint(Constraint("regex", "[0-9]+"), tokenizer, 600)  # doctest: +SKIP
    """
    if tokenizer is None:
        raise ValueError("structured output needs the model's tokenizer")
    compiler = _compiler(tokenizer, vocab_size)
    try:
        return compiler.compile(constraint)
    except ImportError:
        raise
    except Exception as err:  # XGrammar raises RuntimeError/ValueError/its own errors on a bad constraint
        what = {"json_schema": "JSON schema", "json": "JSON grammar", "regex": "regex", "choices": "choices",
                "grammar": "EBNF grammar"}[constraint.kind]
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", message)  # XGrammar's "[time] file.cc:line: " prefix
        raise ValueError(f"XGrammar cannot compile this {what}: {message}") from err


def check_constraints(per_prompt: Sequence[Any], tokenizer: Any, vocab_size: int | None,
                      where: Any) -> dict[int, str]:
    """Compile every distinct constraint of a call once; ``{prompt index: error}`` for those that fail.

    ``per_prompt`` holds each prompt's resolved parameters (``.constraint``); ``where(index)`` names the
    prompt in messages (``params[3]``).
    """
    problems: dict[int, str] = {}
    seen: dict[str, str | None] = {}
    for index, params in enumerate(per_prompt):
        constraint = getattr(params, "constraint", None)
        if constraint is None:
            continue
        if constraint.key not in seen:
            if xgrammar_missing():  # no check here: the HF engines refuse the call, vLLM/OpenVINO check their own
                return {}
            try:
                compile_constraint(constraint, tokenizer, vocab_size)
                seen[constraint.key] = None
            except ValueError as err:
                seen[constraint.key] = str(err)
        if seen[constraint.key] is not None:
            problems[index] = f"{where(index)}: {seen[constraint.key]}"
    return problems


def allocate_bitmask(rows: int, vocab_size: int):
    """A CPU token bitmask for ``rows`` rows (int32, ceil(vocab/32) words per row)."""
    return _xgrammar().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits, bitmask, indices: list[int] | None = None) -> None:
    """Set the logits the bitmask rows forbid to -inf, in place (rows ``indices`` only, when given)."""
    xgr = _xgrammar()
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(logits.shape[-1], bitmask.shape[-1] * 32),
                                    indices=indices)


def new_matcher(compiled: Any, stop_ids: Sequence[int]) -> Any:
    """A fresh matcher of one sequence; the grammar, once complete, allows exactly ``stop_ids``."""
    return _xgrammar().GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)


class GrammarLogitsProcessor:
    """A ``transformers`` logits processor applying each row's grammar (``model.generate``, the static engine).

    ``matchers`` has one entry per batch row (after ``num_return_sequences`` expansion), None for a free row.
    The token each row chose is read back from ``input_ids`` at the next call; rows that already ended
    (end of sequence, their own budget, a stop string: padding follows) are left alone.
    """

    def __init__(self, matchers: Sequence[Any | None], vocab_size: int):
        self.matchers = list(matchers)
        self.vocab_size = vocab_size
        self.bitmask = allocate_bitmask(len(self.matchers), vocab_size)
        self.active = [m is not None for m in self.matchers]
        self.started = False

    def __call__(self, input_ids, scores):
        if scores.shape[0] != len(self.matchers):
            raise RuntimeError(f"GrammarLogitsProcessor: {scores.shape[0]} rows for {len(self.matchers)} matchers")
        if self.started:
            last = input_ids[:, -1].tolist()
            for i, matcher in enumerate(self.matchers):
                if self.active[i] and (matcher.is_terminated() or not matcher.accept_token(last[i])):
                    self.active[i] = False  # ended (padding follows) or finished by another criterion
        self.started = True
        rows = [i for i, on in enumerate(self.active) if on and not self.matchers[i].is_terminated()]
        if not rows:
            return scores
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        scores = scores.clone()  # never write into logits someone else keeps (output_logits)
        apply_bitmask(scores, self.bitmask, rows)
        return scores


def validate_answer(constraint: Constraint, text: str) -> bool:
    """Whether ``text`` satisfies ``constraint`` (JSON kinds need ``jsonschema`` for schemas; regexes use
    Python's ``re``, which agrees with XGrammar on ordinary patterns). For tests and checks."""
    if constraint.kind == "choices":
        return text in constraint.choices
    if constraint.kind == "regex":
        return re.fullmatch(constraint.value, text) is not None
    if constraint.kind in ("json", "json_schema"):
        try:
            value = json.loads(text)
        except ValueError:
            return False
        if constraint.kind == "json":
            return True
        import jsonschema

        try:
            jsonschema.validate(value, constraint.schema)
        except jsonschema.ValidationError:
            return False
        return True
    raise ValueError(f"cannot check a {constraint.kind} constraint here")
