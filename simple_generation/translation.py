"""Translation as a job: each model family's recipe, long documents cut into sentences, pieces batched.

:func:`translate` (``gen.translate``) takes documents, resolves the languages to the model's own codes
(:mod:`simple_generation.languages`; an unknown language fails before anything runs), cuts every document
into sentences (``sentencex``; lines first, so paragraph breaks stay where they were), cuts a sentence still
longer than the model can take at word (then character) boundaries, and sends the pieces of all documents
through the generator's one path (batched, stored per piece: a killed job resumes mid-document). Each
document's translation is its pieces' translations put back between the original whitespace.

The recipes, as HF's own examples run them:

- NLLB, M2M100, mBART-50: the pieces are tokenized with ``tokenizer.src_lang`` set to the source (each piece
  carries its ids: a :class:`SourceText`, whose text ``"<source code> <piece>"`` is what the store key names);
  the target is ``forced_bos_token_id`` (one call per target language);
- Marian (Opus-MT): the pair is the checkpoint's (config or name): another pair is an error; a multi-target
  model gets its ``>>xxx<<`` prefix;
- MADLAD and T5-style ``<2xx>`` models: the target token in front of the text; the original T5: its
  ``translate English to German:`` prefix;
- any other (causal) model: :data:`DEFAULT_TEMPLATE` (or yours), as a user message through the tokenizer's chat
  template when it has one (else the generator's named template, else as it is).

Example:
    >>> gen = SimpleGenerator("facebook/nllb-200-distilled-600M")                        # doctest: +SKIP
    >>> gen.translate("The cat sat on the mat.", target="German", source="English").text  # doctest: +SKIP
    'Die Katze saß auf der Matte.'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import LanguageError
from .languages import ModelLanguages, language_name, model_languages, to_language
from .results import CompletionOutput, GenerationResult

logger = logging.getLogger("simple_generation")

DEFAULT_TEMPLATE = ("Translate the following text from {source} to {target}. Answer with the translation only, "
                    "nothing else.\n\n{text}")
"""The LLM prompt: ``{source}`` and ``{target}`` are English language names, ``{text}`` the piece. Without a
source the ``from {source}`` part is left out."""

_SOURCE_TOKEN_FAMILIES = ("nllb", "m2m100", "mbart50")
_LINE_BREAKS = re.compile(r"\s*\n\s*")


class SourceText(str):
    """A piece's prompt text carrying the token ids it was tokenized to with its source language; the
    formatter feeds those ids (see :meth:`PromptFormatter.tokenize`), and the text is what the store key
    names."""

    token_ids: list[int]

    def __new__(cls, text: str, token_ids: list[int]):
        obj = super().__new__(cls, text)
        obj.token_ids = list(token_ids)
        return obj

    def __reduce__(self):  # pickled with its ids (data-parallel ranks, Ray)
        return (SourceText, (str(self), self.token_ids))


@dataclass
class Translation:
    """One document's translation.

    ``text``: the translation (None when a piece failed: ``error`` says why); ``source``/``target``: the
    model's codes of the languages (``source`` None when none was given to a model that needs none);
    ``pieces``: how many pieces (sentences, or parts of a sentence too long for the model) it was cut into;
    ``finish_reason``: ``"length"`` when any piece ran out of ``max_new_tokens``, else ``"stop"``;
    ``cached``: every piece came from the store; ``piece_results``: each piece's
    :class:`~simple_generation.results.GenerationResult`.

    Example:
        >>> t = gen.translate("Hello. How are you?", target="fr", source="en")      # doctest: +SKIP
        >>> t.text, t.source, t.target, t.pieces                                     # doctest: +SKIP
        ('Bonjour. Comment allez-vous ?', 'eng_Latn', 'fra_Latn', 2)
    """

    index: int
    text: str | None
    source: str | None
    target: str
    pieces: int
    source_text: str
    finish_reason: str | None = None
    error: str | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    piece_results: list[GenerationResult] = field(default_factory=list, repr=False)

    def as_result(self) -> GenerationResult:
        """This translation as a :class:`GenerationResult` (what the job layer writes)."""
        outputs = [] if self.text is None else [CompletionOutput(0, self.text, [], self.finish_reason)]
        return GenerationResult(index=self.index, prompt=self.source_text, outputs=outputs,
                                prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                                error=self.error, cached=self.cached)


# ---------------------------------------------------------------------------------------------- splitting
@dataclass
class Split:
    """A document cut into pieces: ``gaps[i]`` is the original text before ``pieces[i]`` (``gaps[-1]`` after the
    last), so ``join(pieces)`` gives the document back."""

    gaps: list[str]
    pieces: list[str]

    def join(self, pieces: Sequence[str]) -> str:
        out = [self.gaps[0]]
        for piece, gap in zip(pieces, self.gaps[1:]):
            out += [piece, gap]
        return "".join(out)


def split_document(text: str, language: str = "en", sentences: bool = True) -> Split:
    """Cut ``text`` into lines, then sentences (``sentencex``, ``language`` an ISO 639 code); the whitespace
    around and between them is kept in ``gaps``.

    Example:
        >>> split = split_document("Hi there. Bye.\\n\\n  Next line.")
        >>> split.pieces, split.join(split.pieces) == "Hi there. Bye.\\n\\n  Next line."
        (['Hi there.', 'Bye.', 'Next line.'], True)
    """
    spans: list[tuple[int, int]] = []
    at = 0
    for line in _LINE_BREAKS.split(text):
        if not line.strip():
            continue
        start = text.find(line, at)
        parts = _sentences(line, language) if sentences else [line]
        position = start
        for part in parts:
            stripped = part.strip()
            if not stripped:
                continue
            found = text.find(stripped, position, start + len(line))
            if found < 0:  # the splitter changed the text: keep the rest of the line as one piece
                rest = text[position:start + len(line)].strip()
                if rest:
                    found = text.find(rest, position)
                    spans.append((found, found + len(rest)))
                position = start + len(line)
                break
            spans.append((found, found + len(stripped)))
            position = found + len(stripped)
        at = start + len(line)
    gaps, pieces, at = [], [], 0
    for start, end in spans:
        gaps.append(text[at:start])
        pieces.append(text[start:end])
        at = end
    gaps.append(text[at:])
    return Split(gaps, pieces)


def _sentences(line: str, language: str) -> list[str]:
    try:
        from sentencex import segment
    except ImportError as err:  # pragma: no cover - the `translation` extra
        raise ImportError("Splitting documents into sentences needs sentencex: pip install "
                          "'simple-generation[translation]' (or pass split_sentences=False).") from err
    return list(segment(language, line))


def fit_pieces(piece: str, count, limit: int) -> list[str]:
    """``piece`` cut at whitespace (then anywhere) into parts of at most ``limit`` tokens as ``count`` counts
    them; never truncated.

    Example:
        >>> fit_pieces("one two three four", lambda s: len(s.split()), 2)
        ['one two', 'three four']
    """
    return [piece[start:end] for start, end in fit_spans(piece, count, limit)]


def fit_spans(piece: str, count, limit: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """:func:`fit_pieces` as ``(start, end)`` spans of ``piece``: what lies between two spans is the original
    text there (whitespace, or nothing where a word itself was cut)."""
    end = len(piece) if end is None else end
    if count(piece[start:end]) <= limit:
        return [(start, end)]
    words = [match.span() for match in re.finditer(r"\S+", piece[start:end])]
    if len(words) > 1:
        middle = len(words) // 2
        halves = [(start, start + words[middle - 1][1]), (start + words[middle][0], end)]
    elif end - start > 1:
        cut = (start + end) // 2
        halves = [(start, cut), (cut, end)]
    else:
        raise ValueError(f"A single character ({piece[start:end]!r}) is longer than the model's limit of {limit} "
                         "tokens.")
    return [span for half in halves for span in fit_spans(piece, count, limit, *half)]


# ---------------------------------------------------------------------------------------------- the job
class Translator:
    """The translation recipe of one generator: languages, prompts, pieces. :func:`translate` uses it; the CLI
    uses it to read per-record languages.

    Example:
        >>> translator = Translator(gen)                                             # doctest: +SKIP
        >>> translator.languages.family, translator.target_code("German")            # doctest: +SKIP
        ('nllb', 'deu_Latn')
    """

    def __init__(self, generator: Any, template: str | None = None, max_piece_tokens: int | None = None):
        self.gen = generator
        self.tokenizer = generator.tokenizer
        self.languages: ModelLanguages = model_languages(self.tokenizer, generator.config,
                                                         generator.model_name_or_path)
        self.family = self.languages.family
        self.template = template or DEFAULT_TEMPLATE
        if template is not None and self.family != "llm":
            raise ValueError(f"template= is for LLM translators; this is a {self.family} model with its own recipe.")
        for name in ("{target}", "{text}"):
            if name not in self.template:
                raise ValueError(f"The translation template must hold {name} (and may hold {{source}}).")
        context = generator.context_length
        if max_piece_tokens is None:  # an LLM's context holds the prompt and the answer
            max_piece_tokens = context if generator.is_encoder_decoder or context is None else context // 3
        self.max_piece_tokens = max_piece_tokens
        self._codes: dict[tuple[str, str], str] = {}

    # languages
    def source_code(self, spec: str | None) -> str | None:
        if spec is None:
            if self.family in _SOURCE_TOKEN_FAMILIES:
                return getattr(self.tokenizer, "src_lang", None)  # the tokenizer's own default, as HF uses it
            if self.family == "marian":
                return (self.languages.pair or (None, None))[0]
            return None
        return self._code(spec, "source")

    def target_code(self, spec: str | None) -> str:
        if spec is None:
            if self.family == "marian" and self.languages.target_codes is None:
                target = (self.languages.pair or (None, None))[1]
                if target is not None:
                    return target
            raise LanguageError("translate needs a target language (target='German', 'de', 'deu_Latn', ...).")
        return self._code(spec, "target")

    def _code(self, spec: str, role: str) -> str:
        key = (str(spec), role)
        if key not in self._codes:
            self._codes[key] = self.languages.code_for(spec, role)
        return self._codes[key]

    def splitter_language(self, source: str | None) -> str:
        if source is None:
            return "en"
        try:
            return to_language(self.languages.codes.get(source, source)).language or "en"
        except LanguageError:
            return "en"

    # pieces and prompts
    def _bare_ids(self, texts: list[str], source: str | None, target: str | None = None) -> list[list[int]]:
        if self.family in _SOURCE_TOKEN_FAMILIES and source is not None:
            previous = self.tokenizer.src_lang
            try:
                self.tokenizer.src_lang = source
                return self.tokenizer(texts)["input_ids"]
            finally:
                self.tokenizer.src_lang = previous
        return self.tokenizer([self._text(t, source, target) for t in texts])["input_ids"]

    def _text(self, piece: str, source: str | None, target: str | None) -> str:
        family = self.family
        if family == "marian" and self.languages.target_codes is not None and target is not None:
            return f">>{target}<< {piece}"
        if family == "madlad" and target is not None:
            return f"<2{target}> {piece}"
        if family == "t5" and target is not None:
            return f"translate {source or 'English'} to {target}: {piece}"
        return piece

    def pieces(self, text: str, source: str | None, target: str | None = None, split_sentences: bool = True
               ) -> Split:
        """``text`` cut into pieces that each fit the model (see :func:`split_document`, :func:`fit_pieces`)."""
        split = split_document(text, self.splitter_language(source), split_sentences)
        limit = self.max_piece_tokens
        if limit is None:
            return split
        gaps, pieces = [split.gaps[0]], []
        counts = dict(zip(split.pieces, map(len, self._bare_ids(split.pieces, source, target)))) \
            if split.pieces else {}

        def count(piece: str) -> int:
            if piece not in counts:
                counts[piece] = len(self._bare_ids([piece], source, target)[0])
            return counts[piece]

        for piece, gap in zip(split.pieces, split.gaps[1:]):
            spans = fit_spans(piece, count, limit)
            pieces += [piece[start:end] for start, end in spans]
            gaps += [piece[spans[i][1]:spans[i + 1][0]] for i in range(len(spans) - 1)] + [gap]
        return Split(gaps, pieces)

    def prompts(self, pieces: list[str], source: str | None, target: str) -> list[Any]:
        """The prompts of ``pieces`` (one language pair) as the generator takes them."""
        if self.family in _SOURCE_TOKEN_FAMILIES:
            ids = self._bare_ids(pieces, source)
            return [SourceText(f"{source} {piece}", row) for piece, row in zip(pieces, ids)]
        if self.family != "llm":
            return [self._text(piece, source, target) for piece in pieces]
        target_name = language_name(target)
        if source is None:
            template = self.template.replace(" from {source}", "").replace("{source}", "the source language")
            texts = [template.format(target=target_name, text=piece) for piece in pieces]
        else:
            texts = [self.template.format(source=language_name(source), target=target_name, text=piece)
                     for piece in pieces]
        if self.gen.formatter.template is None and getattr(self.tokenizer, "chat_template", None):
            return [[{"role": "user", "content": text}] for text in texts]
        return texts

    def forced_bos(self, target: str) -> int | None:
        if self.family == "nllb" or self.family == "mbart50":
            token = target
        elif self.family == "m2m100":
            token = self.tokenizer.get_lang_token(target)
        else:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise LanguageError(f"The tokenizer has no token for the target {target!r}.", requested=target)
        return token_id


def _per_text(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} languages for {n} texts: give one, or one per text.")
    return values


def translate(generator: Any, texts: str | Sequence[str], target: str | Sequence[str] | None = None,
              source: str | Sequence[str] | None = None, *, template: str | None = None,
              split_sentences: bool = True, max_piece_tokens: int | None = None, **generation_kwargs: Any
              ) -> Translation | list[Translation]:
    """Translate ``texts`` with ``generator`` (see the module docstring); ``gen.translate`` calls this.

    Args:
        texts: a document or a list of documents (any length: they are cut into pieces).
        target, source: a language (name, ISO code, BCP-47 tag or the model's code) for every text, or a list
            with one per text. ``source`` may be None: NLLB/M2M100/mBART then take the tokenizer's ``src_lang``,
            Marian its pair's source, the others leave it to the model.
        template: the LLM prompt (``{source}``, ``{target}``, ``{text}``); default :data:`DEFAULT_TEMPLATE`.
        split_sentences: cut lines into sentences (lines are always cut at line breaks).
        max_piece_tokens: the longest piece in tokens (default: the model's context; a third of it for LLMs).
        **generation_kwargs: as for ``gen.generate`` (``max_new_tokens``, ``num_beams``, ``store``,
            ``batch_size``, ``on_error``, ...). Greedy unless ``temperature``/``do_sample`` say otherwise.

    Returns:
        A :class:`Translation` for a string, else one per text in input order.
    """
    single = isinstance(texts, str)
    documents = [texts] if single else list(texts)
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"texts[{index}] is a {type(document).__name__}; translate takes strings.")
    results = list(iter_translations(Translator(generator, template, max_piece_tokens), documents,
                                     _per_text(target, len(documents), "target"),
                                     _per_text(source, len(documents), "source"),
                                     split_sentences=split_sentences, **generation_kwargs))
    results.sort(key=lambda t: t.index)
    return results[0] if single else results


def iter_translations(translator: Translator, documents: Sequence[str], targets: Sequence[str | None],
                      sources: Sequence[str | None], *, split_sentences: bool = True, runs: list | None = None,
                      **generation_kwargs: Any) -> Iterator[Translation]:
    """The translations of ``documents`` (any order; ``index`` is the position), one generator call per target
    language for the families that take it as ``forced_bos_token_id``, one call otherwise. ``runs`` collects
    each call's ``last_run``."""
    generation_kwargs = dict(generation_kwargs)
    if "temperature" not in generation_kwargs and "do_sample" not in generation_kwargs:
        generation_kwargs["temperature"] = 0  # translation is greedy unless asked otherwise
    generation_kwargs.pop("skip_prompt", None)
    generation_kwargs.pop("plain_prompts", None)
    # every language resolved and every document cut before anything runs
    pairs = [(translator.source_code(s), translator.target_code(t)) for s, t in zip(sources, targets)]
    splits = [translator.pieces(doc, src, tgt, split_sentences) for doc, (src, tgt) in zip(documents, pairs)]
    groups: dict[int | None, list[int]] = {}
    for index, (_, target) in enumerate(pairs):
        groups.setdefault(translator.forced_bos(target), []).append(index)
    llm = translator.family == "llm"
    for forced_bos, members in groups.items():
        prompts: list[Any] = []
        owners: list[int] = []
        by_pair: dict[tuple[str | None, str], list[tuple[int, str]]] = {}
        for index in members:
            for piece in splits[index].pieces:
                by_pair.setdefault(pairs[index], []).append((index, piece))
        for (src, tgt), entries in by_pair.items():
            prompts += translator.prompts([piece for _, piece in entries], src, tgt)
            owners += [index for index, _ in entries]
        call = dict(generation_kwargs)
        if forced_bos is not None:
            call["forced_bos_token_id"] = forced_bos
        results = translator.gen.generate(prompts, skip_prompt=True, plain_prompts=not llm, **call) if prompts \
            else []
        if runs is not None and prompts:
            runs.append(translator.gen.last_run)
        per_document: dict[int, list[GenerationResult]] = {index: [] for index in members}
        for owner, result in zip(owners, results):
            per_document[owner].append(result)
        for index in members:
            yield _assemble(index, documents[index], splits[index], per_document[index], *pairs[index])


def _assemble(index: int, document: str, split: Split, results: list[GenerationResult], source: str | None,
              target: str) -> Translation:
    error = next((r.error for r in results if r.error is not None), None)
    text = None if error is not None else split.join([r.text.strip() for r in results])
    reasons = [r.finish_reason for r in results]
    return Translation(
        index=index, text=text, source=source, target=target, pieces=len(split.pieces), source_text=document,
        finish_reason=None if error is not None else ("length" if "length" in reasons else "stop"), error=error,
        cached=bool(results) and all(r.cached for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        piece_results=results)


def languages_of(generator: Any) -> dict[str, str]:
    """The languages a generator's model translates, as ``{model code: English name}`` (empty for an LLM: any).

    Example:
        >>> languages_of(gen)["deu_Latn"]                                            # doctest: +SKIP
        'German (Latin)'
    """
    langs = model_languages(generator.tokenizer, generator.config, generator.model_name_or_path)
    codes = langs.target_codes if langs.target_codes is not None else langs.codes
    if langs.family == "marian" and not codes:
        codes = {side: side for side in (langs.pair or ()) if side}
    return {code: language_name(tag) for code, tag in codes.items()}


# ---------------------------------------------------------------------------------------------- the job layer
class Document(str):
    """A record's text with its languages (the model's codes) and pieces, or the ``error`` that stops it
    (an unknown language): what :class:`TranslationSource` gives :class:`TranslationJob`."""

    source: str | None
    target: str | None
    error: str | None

    def __new__(cls, text: str, source: str | None = None, target: str | None = None, error: str | None = None):
        obj = super().__new__(cls, text)
        obj.source, obj.target, obj.error = source, target, error
        return obj

    def __reduce__(self):
        return (Document, (str(self), self.source, self.target, self.error))


class TranslationSource:
    """A job source (see :mod:`simple_generation.jobs`) whose records' prompts become :class:`Document` objects:
    a record's own ``source``/``target`` fields win over the run's; the output records get ``source``,
    ``target`` (the model's codes) and ``pieces``.

    Example:
        >>> source = TranslationSource(InputSource(path="docs.jsonl"), Translator(gen), target="de")  # doctest: +SKIP
    """

    def __init__(self, inner: Any, translator: Translator, target: str | None = None, source: str | None = None,
                 split_sentences: bool = True):
        self.inner, self.translator = inner, translator
        self.target, self.source, self.split_sentences = target, source, split_sentences

    @property
    def name(self) -> str:
        return getattr(self.inner, "name", "input")

    def records(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for record in self.inner.records(*args, **kwargs):
            fields = record.fields
            text = record.prompt
            source, target = fields.get("source", self.source), fields.get("target", self.target)
            pieces, error = None, None
            if not isinstance(text, str):
                error = "translate takes text records (this one holds chat messages)"
            elif record.params:
                error = (f"per-record generation parameters ({', '.join(sorted(record.params))}) are not supported "
                         "by translate; set them for the whole run")
            else:
                try:
                    source = self.translator.source_code(source)
                    target = self.translator.target_code(target)
                    pieces = len(self.translator.pieces(text, source, target, self.split_sentences).pieces)
                except (LanguageError, ValueError) as err:
                    error = str(err)
            record.prompt = Document(text if isinstance(text, str) else "", source, target, error)
            record.fields = {**fields, "source": source, "target": target, "pieces": pieces}
            yield record


class TranslationJob:
    """Translation as a generator for :func:`simple_generation.jobs.run_job`: ``stream`` takes
    :class:`Document` prompts and yields one result per document (``answer``: the translation), so the CLI's
    ``translate`` reuses the job layer's windows, writers, store and totals.

    Example:
        >>> translator = Translator(gen)                                                  # doctest: +SKIP
        >>> run_job(TranslationJob(translator), TranslationSource(source, translator, "de"), writer)  # doctest: +SKIP
    """

    reasoning_markers = None

    def __init__(self, translator: Translator, split_sentences: bool = True):
        self.translator = translator
        self.split_sentences = split_sentences
        self.distribution = getattr(translator.gen, "distribution", None)
        self.tokenizer = translator.tokenizer
        self.last_run: Any = None

    def stream(self, prompts: Sequence[Any], *, params: Any = None, skip_prompt: bool = False,
               plain_prompts: bool = False, truncate_prompts: bool = False, **generation: Any
               ) -> Iterator[GenerationResult]:
        runs: list = []
        todo = []
        for index, prompt in enumerate(prompts):
            error = getattr(prompt, "error", None) or (None if isinstance(prompt, Document) else
                                                       "translate takes Document prompts (TranslationSource)")
            if error is not None:
                if generation.get("on_error") == "raise":
                    raise LanguageError(error)
                yield GenerationResult(index=index, prompt=str(prompt), error=error)
            else:
                todo.append(index)
        documents = [prompts[i] for i in todo]
        for translation in iter_translations(self.translator, documents, [d.target for d in documents],
                                             [d.source for d in documents], split_sentences=self.split_sentences,
                                             runs=runs, **generation):
            result = translation.as_result()
            result.index = todo[translation.index]
            yield result
        self.last_run = _Totals(runs)


class _Totals:
    """The summed ``last_run`` of a window's generator calls (what ``run_job`` reads)."""

    def __init__(self, runs: list):
        for name in ("generated_tokens", "cached", "deduplicated"):
            setattr(self, name, sum(getattr(run, name, 0) or 0 for run in runs))
        for name in ("energy_kwh", "emissions_kg_co2eq"):
            values = [getattr(run, name, None) for run in runs if getattr(run, name, None) is not None]
            setattr(self, name, sum(values) if values else None)
