"""From an engine's new token ids to answers: trim, hide template stop ids, decode, cut stop strings,
name the finish reason. Done once here, for every engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from .requests import EngineOutput, RawLogprobs, Request, token_id_list
from .results import CompletionOutput, TokenLogprob, TopLogprob


def eos_ids_of(config, tokenizer) -> set[int]:
    """The EOS ids generation stops at (the config's, else the tokenizer's)."""
    eos = config.eos_token_id
    return set(token_id_list(eos if eos is not None else tokenizer.eos_token_id))


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class PostProcessor:
    """Turns ``(request, EngineOutput)`` into texts, kept token ids and finish reasons.

    ``hidden_stop_ids``: a named template's stop ids, which end generation like EOS but are never
    shown (they need not be special tokens, so ``skip_special_tokens`` would keep them).
    ``shown_special``: special tokens decoded as their text all the same (id -> text): reasoning markers that a
    tokenizer made special, so that the answer's text still holds its ``<think>...</think>`` block (see
    :func:`special_marker_tokens`). ``reasoning_markers``: split each answer's reasoning off
    (:meth:`split_outputs`), None: off.
    """

    def __init__(self, tokenizer, is_encoder_decoder: bool, hidden_stop_ids: Sequence[int] = (), *,
                 shown_special: Mapping[int, str] | None = None, reasoning_markers: tuple[str, str] | None = None):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.hidden_stop_ids = set(hidden_stop_ids)
        self.shown_special = dict(shown_special or {})
        self.reasoning_markers = reasoning_markers
        self._eos_cache: dict[int, set[int]] = {}
        self._token_texts: dict[int, str] = {}

    def _eos(self, request: Request) -> set[int]:
        key = id(request.params)
        if key not in self._eos_cache:
            self._eos_cache[key] = eos_ids_of(request.params.config, self.tokenizer)
        return self._eos_cache[key]

    def finish(self, request: Request, output: EngineOutput) -> tuple[list[str], list[list[int]], list[str], int]:
        """(texts, token ids, finish reasons, completion tokens) of one finished request."""
        eos_ids = self._eos(request)
        texts, kept, reasons = [], [], []
        completion_tokens = 0
        engine_reasons = output.finish_reasons or [None] * len(output.sequences)
        for sequence, engine_reason in zip(output.sequences, engine_reasons):
            tokens = list(sequence[: request.max_new_tokens])
            reason = None
            for position, token in enumerate(tokens):
                if token in eos_ids:
                    tokens = tokens[: position + 1]
                    reason = "stop"
                    break
            completion_tokens += len(tokens)
            if reason is None:
                reason = "length" if len(tokens) >= request.max_new_tokens else (engine_reason or "stop")
            shown = tokens[:-1] if tokens and tokens[-1] in eos_ids and tokens[-1] in self.hidden_stop_ids else tokens
            text = self.decode(shown)
            text, stopped = cut_at_stop(text, request.params.stop_strings)
            if stopped:
                reason = "stop_string"
            elif engine_reason == "stop_string":
                reason = "stop_string"
            texts.append(text)
            kept.append(shown)
            reasons.append(reason)
        return texts, kept, reasons, completion_tokens

    # feature: logprobs ------------------------------------------------------------------------------
    @staticmethod
    def trim_logprobs(output: EngineOutput, kept: list[list[int]]) -> list[RawLogprobs] | None:
        """The engine's per-sequence logprobs cut as :meth:`finish` cut the token ids (EOS, budget, a hidden
        template stop id): entry ``t`` stays the logprob of ``kept[j][t]``."""
        if output.logprobs is None:
            return None
        return [raw.cut(len(ids)) for raw, ids in zip(output.logprobs, kept)]

    def token_text(self, token_id: int) -> str:
        """One token's text, as the tokenizer decodes it alone (cached)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def token_logprobs(self, raw: RawLogprobs) -> list[TokenLogprob]:
        """Typed, decoded entries of ``raw``."""
        text = self.token_text
        return [TokenLogprob(token_id, text(token_id), logprob,
                             [TopLogprob(i, text(i), lp) for i, lp in zip(top_ids, top_lps)])
                for token_id, logprob, top_ids, top_lps in zip(raw.token_ids, raw.logprobs, raw.top_ids,
                                                               raw.top_logprobs)]

    def split_outputs(self, outputs: list[CompletionOutput], prompt: str) -> list[CompletionOutput]:
        """The outputs with their reasoning split off (:func:`split_reasoning`), when markers are set.

        Done on every answer as it leaves the pipeline, fresh or from the store (which keeps the raw text)."""
        markers = self.reasoning_markers
        if markers is None:
            return outputs
        opened = prompt_opens_reasoning(prompt, markers)
        split = []
        for output in outputs:
            reasoning, text = split_reasoning(output.text, markers, opened)
            split.append(output if reasoning is None else replace(output, text=text, reasoning=reasoning))
        return split

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids to text, special tokens skipped (but those of :attr:`shown_special` written as their text)."""
        shown = self.shown_special
        if not shown or not any(token in shown for token in token_ids):
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        parts, start = [], 0
        for position, token in enumerate(token_ids):
            if token in shown:
                parts += [self.tokenizer.decode(token_ids[start:position], skip_special_tokens=True), shown[token]]
                start = position + 1
        parts.append(self.tokenizer.decode(token_ids[start:], skip_special_tokens=True))
        return "".join(parts)

    def echo(self, prompt_ids: list[int], new_ids: list[int], text: str, reason: str, *, split: bool = False) -> str:
        """The answer with its prompt in front (``skip_prompt=False`` on causal models).

        Decoding prompt and answer together keeps the text exactly as the tokenizer joins them; an
        answer cut at a stop string, or whose reasoning was split off (``split``), is the prompt's text plus
        the answer's.
        """
        if self.is_encoder_decoder:
            return text
        if reason == "stop_string" or split:
            return self.decode(list(prompt_ids)) + text
        return self.decode(list(prompt_ids) + list(new_ids))


# feature: reasoning ------------------------------------------------------------------------------------
DEFAULT_REASONING_MARKERS = ("<think>", "</think>")


def detect_reasoning_markers(tokenizer) -> tuple[str, str] | None:
    """``("<think>", "</think>")`` when the tokenizer's chat template mentions ``<think>`` or its vocabulary
    has both markers as tokens (Qwen3, DeepSeek-R1 and their families), else None.

    Example:
        >>> detect_reasoning_markers(AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B"))   # doctest: +SKIP
        ('<think>', '</think>')
    """
    opening, closing = DEFAULT_REASONING_MARKERS
    template = getattr(tokenizer, "chat_template", None)
    templates = list(template.values()) if isinstance(template, dict) else [template]
    if any(isinstance(text, str) and opening in text for text in templates):
        return DEFAULT_REASONING_MARKERS
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: no markers
        return None
    return DEFAULT_REASONING_MARKERS if opening in vocab and closing in vocab else None


def resolve_reasoning_markers(value, tokenizer) -> tuple[str, str] | None:
    """``reasoning_markers`` as given to ``SimpleGenerator`` or a call: ``"auto"`` (detected, see
    :func:`detect_reasoning_markers`), None/False (off) or an ``(opening, closing)`` pair of strings."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value == "auto":
            return detect_reasoning_markers(tokenizer)
        raise ValueError(f'reasoning_markers must be "auto", None or a pair of strings such as ("<think>", '
                         f'"</think>"), got {value!r}.')
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(marker, str) and marker.strip() for marker in value) or value[0] == value[1]):
        raise ValueError(f'reasoning_markers must be "auto", None or a pair of two different non-empty strings '
                         f'such as ("<think>", "</think>"), got {value!r}.')
    return (value[0], value[1])


def special_marker_tokens(tokenizer, markers: tuple[str, str] | None) -> dict[int, str]:
    """The markers that are single *special* tokens of ``tokenizer`` (id -> text): decoding with
    ``skip_special_tokens`` would drop them, so :class:`PostProcessor` writes them out (``shown_special``)."""
    if markers is None:
        return {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    vocab = tokenizer.get_vocab()
    return {vocab[marker]: marker for marker in markers if marker in vocab and vocab[marker] in special}


def prompt_opens_reasoning(prompt: str, markers: tuple[str, str]) -> bool:
    r"""Whether the prompt ends inside an opened reasoning block (Qwen3-Thinking's and DeepSeek-R1's templates
    end the generation prompt with ``<think>\n``): the answer then holds only the closing marker."""
    return prompt.rstrip().endswith(markers[0])


def split_reasoning(text: str, markers: tuple[str, str], opened: bool = False) -> tuple[str | None, str]:
    r"""``(reasoning, answer)`` of an answer's text: the reasoning is the text of its first
    ``opening...closing`` block, the answer the text after it (and any before it).

    ``opened``: the prompt already opened the block (:func:`prompt_opens_reasoning`), so the text starts inside
    it. A closing marker without an opening one also ends a block that started with the text (the prompt's
    opening may be a special token that the decoded prompt does not show). A block never closed (the answer
    ran out of ``max_new_tokens`` while thinking) is all reasoning, with an empty answer. No block: reasoning
    None, the text unchanged. As Qwen3's chat template does when it writes a past reasoning turn, newlines
    around the reasoning and in front of the answer are left out.

    Example:
        >>> split_reasoning("<think>\n2 + 2 is 4.\n</think>\n\nFour.", ("<think>", "</think>"))
        ('2 + 2 is 4.', 'Four.')
        >>> split_reasoning("2 + 2 is", ("<think>", "</think>"), opened=True)
        ('2 + 2 is', '')
        >>> split_reasoning("Four.", ("<think>", "</think>"))
        (None, 'Four.')
    """
    opening, closing = markers
    start, end = text.find(opening), text.find(closing)
    if end >= 0:
        after = text[end + len(closing):].lstrip("\n")
        if 0 <= start < end:
            before = text[:start]
            return text[start + len(opening):end].strip("\n"), (before + after) if before.strip() else after
        return text[:end].strip("\n"), after  # closing only: the block started with the text
    if start >= 0 and not text[:start].strip():  # opened, never closed
        return text[start + len(opening):].strip("\n"), ""
    if opened:
        return text.strip("\n"), ""
    return None, text
