"""Languages as users name them, resolved to each translation model's own codes (torch-free).

A language may be given as a name (``"German"``, ``"deutsch"``), an ISO 639-1/639-3 code (``"de"``,
``"deu"``), a BCP-47 tag (``"de-CH"``, ``"zh-Hant"``) or the model's own code (``"deu_Latn"``, ``"de_DE"``).
:func:`model_languages` reads which languages a checkpoint knows and how it is told them:

=========  ===============================  =========================================================
family     codes (read from)                source / target
=========  ===============================  =========================================================
nllb       ``deu_Latn`` (tokenizer tokens)  ``tokenizer.src_lang``; ``forced_bos_token_id``
m2m100     ``de`` (``lang_code_to_id``)     ``tokenizer.src_lang``; ``forced_bos_token_id`` (``__de__``)
mbart50    ``de_DE`` (``lang_code_to_id``)  ``tokenizer.src_lang``; ``forced_bos_token_id``
marian     the pair (config or name), or    fixed pair; a multi-target model's ``>>deu<<`` prefix
           ``>>deu<<`` tokens
madlad     ``<2de>`` tokens (T5-style)      target prefix ``<2de> `` on the source text
t5         English, German, French,         ``translate English to German: `` prefix
           Romanian (the original T5)
llm        any language langcodes knows     a prompt template naming both languages
=========  ===============================  =========================================================

Matching uses ``langcodes.tag_distance``: ``"de"`` finds ``deu_Latn``, ``"fa"`` finds ``pes_Arab``, ``"zh"``
finds ``zho_Hans`` (not ``zho_Hant``: a different script is too far). A language the model does not have
raises :class:`~simple_generation.errors.LanguageError` naming the closest codes it has, before any
generation.

Example:
    >>> to_language("German").to_tag(), to_language("deu").to_tag(), to_language("deu_Latn").to_tag()
    ('de', 'de', 'de-Latn')
    >>> ModelLanguages("m2m100", {"de": "de", "en": "en"}).code_for("German")
    'de'
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LanguageError

# at most this langcodes distance between what was asked and a model's code (<= 9: "minor differences", e.g. a
# region or a macrolanguage member; a different script or language is further)
MAX_DISTANCE = 9

_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_MBART_CODE = re.compile(r"^[a-z]{2,3}_[A-Z]{2}$")
_T5_TARGET = re.compile(r"^<2([A-Za-z]{2,3}(?:[_-][A-Za-z0-9]{2,4})*)>$")
_MARIAN_TARGET = re.compile(r"^>>([A-Za-z]{2,3}(?:_[A-Za-z]{4})?)<<$")
_OPUS_NAME = re.compile(r"opus-mt-(?:tc-(?:big|base)-)?([A-Za-z]+(?:_[A-Za-z]+)*)-([A-Za-z]+(?:_[A-Za-z]+)*)")
_ORIGINAL_T5 = {"English": "en", "German": "de", "French": "fr", "Romanian": "ro"}


def _langcodes():
    try:
        import langcodes
    except ImportError as err:  # pragma: no cover - the `translation` extra
        raise ImportError("Language names and tags need langcodes: pip install 'simple-generation[translation]'."
                          ) from err
    return langcodes


def to_language(spec: str) -> Any:
    """A ``langcodes.Language`` for a name, ISO 639 code, BCP-47 tag or model code; :class:`LanguageError`
    when it is none of them."""
    langcodes = _langcodes()
    if not isinstance(spec, str) or not spec.strip():
        raise LanguageError(f"A language must be a non-empty string (a name, an ISO code or a tag), got {spec!r}.")
    text = spec.strip()
    tag = text.strip("_<>").removeprefix("2").replace("_", "-")
    if tag.upper().endswith("-XX"):  # mBART's "no region"
        tag = tag[:-3]
    if langcodes.tag_is_valid(tag):
        language = langcodes.Language.get(tag)
        if language.is_valid():
            return language
    try:
        return langcodes.find(text)
    except LookupError:
        raise LanguageError(f"Unknown language {spec!r}: not a language name, ISO 639 code or BCP-47 tag that "
                            "langcodes knows.", requested=spec) from None


def language_name(tag: str) -> str:
    """The English name of a tag (``"de"`` -> ``"German"``), as prompts for LLM translators write it."""
    language = _langcodes().Language.get(tag)
    return language.display_name() if language.language else tag


@dataclass
class ModelLanguages:
    """The languages a translation model knows: ``family`` (see the module docstring), ``codes`` (the model's
    code -> its BCP-47 tag; empty for an LLM, which takes any language), and for Marian checkpoints the
    ``pair`` its name or config gives (either side None when unknown or a group such as ``ROMANCE``)."""

    family: str
    codes: dict[str, str] = field(default_factory=dict)
    pair: tuple[str | None, str | None] | None = None
    target_codes: dict[str, str] | None = None  # when the targets differ from the sources (multi-target Marian)

    def code_for(self, spec: str, role: str = "target") -> str:
        """The model's code for ``spec`` as a ``role`` ("source" or "target") language.

        Raises :class:`LanguageError` (a ValueError) naming the closest languages the model has."""
        codes = self.target_codes if role == "target" and self.target_codes is not None else self.codes
        if self.family == "marian" and not codes:
            return self._marian_side(spec, role)
        if spec in codes:
            return spec
        if not codes:  # an LLM: any language langcodes knows, by its tag
            return to_language(spec).to_tag()
        try:
            wanted = to_language(spec)
        except LanguageError:
            labels: dict[str, str] = {}  # a lower-case name or code -> the model's code
            for code, tag in codes.items():
                labels.setdefault(language_name(tag).lower(), code)
                labels.setdefault(code.lower(), code)
            close = list(dict.fromkeys(labels[label] for label in
                                       difflib.get_close_matches(str(spec).lower(), list(labels), n=8, cutoff=0.6)))[:5]
            shown = ", ".join(f"{code} ({language_name(codes[code])})" for code in close) or "none"
            raise LanguageError(
                f"Unknown language {spec!r}; this {self.family} model's {role} languages close to it: {shown} "
                f"({len(codes)} in all: simple_generation.translation.languages_of(gen) lists them).",
                requested=spec, closest=close) from None
        ranked = self._ranked(wanted, codes)
        if ranked and ranked[0][0] <= MAX_DISTANCE:
            return ranked[0][1]
        closest = [code for _, code in ranked[:5]]
        shown = ", ".join(f"{code} ({language_name(codes[code])})" for code in closest)
        raise LanguageError(
            f"{spec!r} ({wanted.display_name()}) is not a {role} language of this {self.family} model; the "
            f"closest it has: {shown}.", requested=spec, closest=closest)

    @staticmethod
    def _ranked(wanted: Any, codes: dict[str, str]) -> list[tuple[int, str]]:
        langcodes = _langcodes()
        desired = wanted.to_tag()
        ranked = []
        for code, tag in codes.items():
            try:
                ranked.append((langcodes.tag_distance(desired, tag), code))
            except Exception:  # noqa: BLE001 - a code langcodes cannot compare is never a match
                continue
        ranked.sort(key=lambda pair: pair[0])
        return ranked

    def _marian_side(self, spec: str, role: str) -> str:
        side = (self.pair or (None, None))[0 if role == "source" else 1]
        if side is None:
            return to_language(spec).to_tag()  # a group (mul, ROMANCE) or unknown: the model decides
        if spec == side:
            return side
        wanted = to_language(spec)
        if self._ranked(wanted, {side: side}) and self._ranked(wanted, {side: side})[0][0] <= MAX_DISTANCE:
            return side
        pair = f"{self.pair[0] or '?'}->{self.pair[1] or '?'}"
        raise LanguageError(f"This Marian model translates {pair} only; {role} {spec!r} "
                            f"({wanted.display_name()}) is not its {role} ({side}, {language_name(side)}). "
                            "Pick the opus-mt checkpoint of that pair.", requested=spec, closest=[side])


def _tag_of(code: str) -> str | None:
    try:
        return to_language(code).to_tag()
    except LanguageError:
        return None


def _tags(codes) -> dict[str, str]:
    out = {}
    for code in codes:
        tag = _tag_of(code)
        if tag is not None:
            out[code] = tag
    return out


def model_languages(tokenizer: Any, config: Any, name_or_path: str = "") -> ModelLanguages:
    """Which family a checkpoint's translation recipe is, and its language codes (see the module docstring).

    Example:
        >>> langs = model_languages(gen.tokenizer, gen.config, gen.model_name_or_path)   # doctest: +SKIP
        >>> langs.family, langs.code_for("German")                                         # doctest: +SKIP
        ('nllb', 'deu_Latn')
    """
    model_type = getattr(config, "model_type", "")
    tokenizer_class = type(tokenizer).__name__
    lang_code_to_id = getattr(tokenizer, "lang_code_to_id", None)
    if not getattr(config, "is_encoder_decoder", False):
        return ModelLanguages("llm")
    if model_type == "marian":
        targets = _marian_targets(tokenizer)
        return ModelLanguages("marian", {}, pair=_marian_pair(tokenizer, name_or_path),
                              target_codes=_tags(targets) if targets else None)
    if "Nllb" in tokenizer_class or (not lang_code_to_id and _has_tokens(tokenizer, _NLLB_CODE)):
        return ModelLanguages("nllb", _tags(_tokens_matching(tokenizer, _NLLB_CODE)))
    if lang_code_to_id and ("M2M100" in tokenizer_class or model_type == "m2m_100"):
        return ModelLanguages("m2m100", _tags(lang_code_to_id))
    if lang_code_to_id and "MBart" in tokenizer_class:
        return ModelLanguages("mbart50", _tags(lang_code_to_id))
    targets = {match.group(1): token for token in _tokens_matching(tokenizer, _T5_TARGET)
               for match in [_T5_TARGET.match(token)]}
    if targets:
        return ModelLanguages("madlad", _tags(targets))
    if model_type in ("t5", "mt5", "umt5"):
        return ModelLanguages("t5", dict(_ORIGINAL_T5))
    raise LanguageError(f"{name_or_path or 'This model'} is a {model_type or 'seq2seq'} model with no translation "
                        "recipe simple-generation knows (NLLB, M2M100, mBART-50, Marian, MADLAD/T5): generate with "
                        "your own prompts instead.")


def _vocab(tokenizer: Any) -> list[str]:
    try:
        return list(tokenizer.get_vocab())
    except Exception:  # noqa: BLE001
        return []


def _tokens_matching(tokenizer: Any, pattern: re.Pattern) -> list[str]:
    extra = getattr(tokenizer, "additional_special_tokens", None) or []
    seen = dict.fromkeys(t for t in [*extra, *_vocab(tokenizer)] if isinstance(t, str) and pattern.match(t))
    return list(seen)


def _has_tokens(tokenizer: Any, pattern: re.Pattern) -> bool:
    return len(_tokens_matching(tokenizer, pattern)) >= 2


def _marian_targets(tokenizer: Any) -> list[str]:
    return [match.group(1) for token in _tokens_matching(tokenizer, _MARIAN_TARGET)
            for match in [_MARIAN_TARGET.match(token)]]


def _marian_pair(tokenizer: Any, name_or_path: str) -> tuple[str | None, str | None]:
    source, target = getattr(tokenizer, "source_lang", None), getattr(tokenizer, "target_lang", None)
    if not (source and target):
        match = _OPUS_NAME.search(str(name_or_path))
        if match:
            source, target = match.group(1), match.group(2)
    return (source if source and _tag_of(source) else None, target if target and _tag_of(target) else None)
