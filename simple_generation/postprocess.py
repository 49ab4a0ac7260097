"""From an engine's new token ids to answers: trim, hide template stop ids, decode, cut stop strings,
name the finish reason. Done once here, for every engine."""

from __future__ import annotations

from collections.abc import Sequence

from .requests import EngineOutput, Request, token_id_list


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
    """

    def __init__(self, tokenizer, is_encoder_decoder: bool, hidden_stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.hidden_stop_ids = set(hidden_stop_ids)
        self._eos_cache: dict[int, set[int]] = {}

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
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, request.params.stop_strings)
            if stopped:
                reason = "stop_string"
            elif engine_reason == "stop_string":
                reason = "stop_string"
            texts.append(text)
            kept.append(shown)
            reasons.append(reason)
        return texts, kept, reasons, completion_tokens

    def echo(self, prompt_ids: list[int], new_ids: list[int], text: str, reason: str) -> str:
        """The answer with its prompt in front (``skip_prompt=False`` on causal models).

        Decoding prompt and answer together keeps the text exactly as the tokenizer joins them; an
        answer cut at a stop string is the prompt's text plus the cut answer.
        """
        if self.is_encoder_decoder:
            return text
        if reason == "stop_string":
            return self.tokenizer.decode(prompt_ids, skip_special_tokens=True) + text
        return self.tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
