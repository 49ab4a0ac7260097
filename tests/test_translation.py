"""gen.translate: each family's recipe equals HF's unbatched generate, languages resolve (or fail naming close
ones), long documents keep their whitespace, a store resumes per piece; the translate command."""

import json
import sqlite3

import pytest

pytest.importorskip("langcodes")
pytest.importorskip("sentencex")
pytest.importorskip("sentencepiece")

import torch  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from simple_generation import SimpleGenerator  # noqa: E402
from simple_generation.errors import LanguageError  # noqa: E402
from simple_generation.languages import ModelLanguages, to_language  # noqa: E402
from simple_generation.translation import DEFAULT_TEMPLATE, Translator, fit_pieces, split_document  # noqa: E402

from .translation_models import build_m2m100, build_madlad, build_marian, build_mbart50, build_nllb  # noqa: E402

DOCS = ["The quick brown fox jumps. Dr. Smith paid 3.50 dollars for the book.",
        "Hello world!",
        "A journey begins with a single step.\n\n  Once upon a time there was a small model.  \nTell me what is two."]
NEW = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory, t5_path):
    root = tmp_path_factory.mktemp("translation")
    return {"nllb": build_nllb(root / "nllb"), "m2m100": build_m2m100(root / "m2m100"),
            "mbart50": build_mbart50(root / "mbart50"), "marian": build_marian(root / "opus-mt-en-de"),
            "madlad": build_madlad(root / "madlad", t5_path)}


def _gen(path, **kwargs):
    return SimpleGenerator(path, track_emissions=False, **kwargs)


def _hf(path, pieces, *, src_lang=None, forced_bos=None, prefix="", ids=False):
    """HF's recipe, one piece at a time: src_lang on the tokenizer, forced BOS, or a text prefix; the decoded
    texts, or (``ids``) the generated ids after the decoder start."""
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if src_lang is not None:
        tokenizer.src_lang = src_lang
    out = []
    for piece in pieces:
        inputs = tokenizer(prefix + piece, return_tensors="pt")
        extra = {"forced_bos_token_id": forced_bos} if forced_bos is not None else {}
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **extra)[0]
        out.append(generated[1:].tolist() if ids else tokenizer.decode(generated, skip_special_tokens=True).strip())
    return out


def _pieces_out(translations):
    return [r.text.strip() for t in translations for r in t.piece_results]


def _pieces_in(translations):
    return [p for t in translations for p in split_document(t.source_text).pieces]


@pytest.mark.parametrize("family,source,target,src_code,tgt_code", [
    ("nllb", "English", "German", "eng_Latn", "deu_Latn"),
    ("m2m100", "en", "fr", "en", "fr"),
    ("mbart50", "eng", "de-DE", "en_XX", "de_DE"),
])
def test_source_token_families_equal_hf(models, family, source, target, src_code, tgt_code):
    gen = _gen(models[family])
    translations = gen.translate(DOCS, target=target, source=source, max_new_tokens=NEW, batch_size=4,
                                 show_progress_bar=False)
    assert [(t.source, t.target) for t in translations] == [(src_code, tgt_code)] * len(DOCS)
    assert [t.pieces for t in translations] == [2, 1, 3]
    tokenizer = gen.tokenizer
    forced = tokenizer.convert_tokens_to_ids(tokenizer.get_lang_token(tgt_code) if family == "m2m100" else tgt_code)
    assert _pieces_out(translations) == _hf(models[family], _pieces_in(translations), src_lang=src_code,
                                            forced_bos=forced)
    # token for token, the target's token (forced BOS) first
    ours = [r.outputs[0].token_ids for t in translations for r in t.piece_results]
    assert ours == _hf(models[family], _pieces_in(translations), src_lang=src_code, forced_bos=forced, ids=True)
    assert all(row[0] == forced for row in ours)


def test_source_language_changes_the_input_and_the_key(models, tmp_path):
    gen = _gen(models["nllb"])
    store = tmp_path / "s.sqlite"
    english = gen.translate("Hello world!", target="de", source="en", max_new_tokens=NEW, store=store,
                            show_progress_bar=False)
    french = gen.translate("Hello world!", target="de", source="fr", max_new_tokens=NEW, store=store,
                           show_progress_bar=False)
    assert not french.cached and french.source == "fra_Latn"
    assert _pieces_out([french]) == _hf(models["nllb"], ["Hello world!"], src_lang="fra_Latn",
                                        forced_bos=gen.tokenizer.convert_tokens_to_ids("deu_Latn"))
    spanish_target = gen.translate("Hello world!", target="es", source="en", max_new_tokens=NEW, store=store,
                                   show_progress_bar=False)
    assert not spanish_target.cached
    again = gen.translate("Hello world!", target="German", source="English", max_new_tokens=NEW, store=store,
                          show_progress_bar=False)
    assert again.cached and again.text == english.text
    assert gen.tokenizer.src_lang == "eng_Latn"  # the tokenizer's own setting is restored


def test_mixed_targets_and_sources_in_one_call(models):
    gen = _gen(models["m2m100"])
    translations = gen.translate(["Hello world!", "Guten Tag.", "Bonjour."], target=["de", "fr", "de"],
                                 source=["en", "de", "fr"], max_new_tokens=NEW, show_progress_bar=False)
    assert [(t.index, t.source, t.target) for t in translations] == [(0, "en", "de"), (1, "de", "fr"),
                                                                      (2, "fr", "de")]
    for t in translations:
        assert _pieces_out([t]) == _hf(models["m2m100"], [t.source_text], src_lang=t.source,
                                       forced_bos=gen.tokenizer.get_lang_id(t.target))


def test_marian_pair_from_the_name(models):
    gen = _gen(models["marian"])
    translations = gen.translate(DOCS, target="German", max_new_tokens=NEW, show_progress_bar=False)
    assert {(t.source, t.target) for t in translations} == {("en", "de")}
    assert _pieces_out(translations) == _hf(models["marian"], _pieces_in(translations))
    assert [r.outputs[0].token_ids for t in translations for r in t.piece_results] == \
        _hf(models["marian"], _pieces_in(translations), ids=True)
    with pytest.raises(LanguageError, match=r"en->de only.*French"):
        gen.translate("Hello", target="French")
    with pytest.raises(LanguageError, match="source"):
        gen.translate("Hello", target="de", source="ja")


def test_marian_multi_target_prefix(tmp_path):
    path = build_marian(tmp_path / "opus-mt-en-ROMANCE", targets=("fra", "spa", "ita"))
    gen = _gen(path)
    translation = gen.translate("Hello world!", target="Spanish", max_new_tokens=NEW, show_progress_bar=False)
    assert translation.target == "spa"
    assert _pieces_out([translation]) == _hf(path, ["Hello world!"], prefix=">>spa<< ")


def test_madlad_target_prefix(models):
    gen = _gen(models["madlad"])
    translations = gen.translate(DOCS, target="French", max_new_tokens=NEW, show_progress_bar=False)
    assert {t.target for t in translations} == {"fr"}
    assert _pieces_out(translations) == _hf(models["madlad"], _pieces_in(translations), prefix="<2fr> ")
    assert [r.outputs[0].token_ids for t in translations for r in t.piece_results] == \
        _hf(models["madlad"], _pieces_in(translations), prefix="<2fr> ", ids=True)
    with pytest.raises(LanguageError, match="closest it has"):
        gen.translate("Hello", target="Japanese")


def test_llm_prompt_template(llama_path):
    from .reference import hf_greedy

    gen = _gen(llama_path)
    translations = gen.translate(["Hello world. The fox."], target="German", source="English", max_new_tokens=NEW,
                                 show_progress_bar=False)
    pieces = split_document("Hello world. The fox.").pieces
    prompts = [DEFAULT_TEMPLATE.format(source="English", target="German", text=p) for p in pieces]
    assert _pieces_out(translations) == [a.strip() for a in hf_greedy(llama_path, prompts, NEW)]
    custom = gen.translate("Hi.", target="fr", template="{text} in {target}:", max_new_tokens=NEW,
                           show_progress_bar=False)
    assert custom.piece_results[0].prompt == "Hi. in French:"


def test_chat_llm_gets_the_prompt_as_a_user_message(llama_path, tmp_path):
    import shutil

    chat = tmp_path / "chat"
    shutil.copytree(llama_path, chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(chat)
    gen = _gen(str(chat))
    translation = gen.translate("Hello world.", target="it", max_new_tokens=NEW, show_progress_bar=False)
    prompt = DEFAULT_TEMPLATE.replace(" from {source}", "").format(target="Italian", text="Hello world.")
    assert translation.piece_results[0].prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    direct = gen.generate([[{"role": "user", "content": prompt}]], max_new_tokens=NEW, temperature=0,
                          skip_prompt=True, show_progress_bar=False)[0]
    assert translation.text == direct.text.strip() and translation.source is None and translation.target == "it"


def test_unknown_language_names_close_ones(models):
    gen = _gen(models["nllb"])
    with pytest.raises(LanguageError) as err:
        gen.translate("Hello", target="Germn", max_new_tokens=2)
    assert "German" in str(err.value) and err.value.closest
    with pytest.raises(LanguageError) as err:
        gen.translate("Hello", target="Klingon", max_new_tokens=2)  # a language, but not one of NLLB's
    assert "closest it has" in str(err.value)
    with pytest.raises(ValueError, match="zho_Hans"):
        ModelLanguages("nllb", {"zho_Hans": "zh-Hans", "eng_Latn": "en-Latn"}).code_for("Chinese (Traditional)")
    assert ModelLanguages("nllb", {"zho_Hans": "zh-Hans", "zho_Hant": "zh-Hant"}).code_for("zh-TW") == "zho_Hant"
    assert ModelLanguages("nllb", {"pes_Arab": "pes-Arab"}).code_for("Persian") == "pes_Arab"
    assert to_language("deu").to_tag() == "de" and to_language("Deutsch").to_tag() == "de"


def test_document_whitespace_round_trips():
    doc = "  First sentence. Dr. Smith paid 3.50 dollars.\n\n\tSecond paragraph!  Third one?\r\nLast line.\n\n"
    split = split_document(doc)
    assert split.pieces == ["First sentence.", "Dr. Smith paid 3.50 dollars.", "Second paragraph!", "Third one?",
                            "Last line."]
    assert split.join(split.pieces) == doc
    assert split.join([p.upper() for p in split.pieces]) == doc.upper()
    assert split_document("").pieces == [] and split_document("   \n ").join([]) == "   \n "
    # Japanese sentences, no spaces between them
    assert split_document("今日は晴れです。明日は雨です。", "ja").pieces == ["今日は晴れです。", "明日は雨です。"]


def test_translated_document_keeps_paragraphs(models):
    gen = _gen(models["nllb"])
    doc = "  Hello world. The fox.\n\n\tSecond para!  \n"
    translation = gen.translate(doc, target="de", source="en", max_new_tokens=NEW, show_progress_bar=False)
    outs = [r.text.strip() for r in translation.piece_results]
    assert translation.pieces == 3
    assert translation.text == f"  {outs[0]} {outs[1]}\n\n\t{outs[2]}  \n"


def test_long_pieces_are_cut_never_truncated(models):
    gen = _gen(models["nllb"])
    sentence = " ".join(["fox"] * 300) + "."  # one sentence, longer than the model's 128 positions
    translation = gen.translate(sentence, target="de", source="en", max_new_tokens=2, show_progress_bar=False)
    assert translation.pieces > 2 and translation.error is None
    assert all(r.prompt_tokens <= 128 for r in translation.piece_results)
    assert fit_pieces("a b  c\td", lambda s: len(s.split()), 1) == ["a", "b", "c", "d"]
    assert "".join(fit_pieces("abcdefgh", len, 3)) == "abcdefgh"
    # a long word (as a sentence of a script without spaces) is cut between characters: nothing is added there
    translator = Translator(gen, max_piece_tokens=12)
    word = "quickbrownfoxjumps" * 4 + "."
    split = translator.pieces(word, "eng_Latn", "deu_Latn")
    assert len(split.pieces) > 1 and split.join(split.pieces) == word and set(split.gaps[1:-1]) == {""}
    long_sentence = "  " + " ".join(["fox"] * 40) + ".\n"
    split = translator.pieces(long_sentence, "eng_Latn", "deu_Latn")
    assert len(split.pieces) > 1 and split.join(split.pieces) == long_sentence


def test_resume_translates_only_missing_pieces(models, tmp_path):
    gen = _gen(models["nllb"])
    store = tmp_path / "run.sqlite"
    first = gen.translate(DOCS[:2], target="de", source="en", max_new_tokens=NEW, store=store,
                          show_progress_bar=False)
    with sqlite3.connect(store) as db:
        stored = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert stored == 3  # one row per piece
    # a "killed" job: the first two documents' pieces are there; the third document is new
    again = gen.translate(DOCS, target="de", source="en", max_new_tokens=NEW, store=store, show_progress_bar=False)
    assert [t.cached for t in again] == [True, True, False]
    assert gen.last_run.cached == 3 and gen.last_run.prompts == 6
    assert [t.text for t in again[:2]] == [t.text for t in first]


def test_translate_command(models, tmp_path):
    from simple_generation.cli import main

    source = tmp_path / "docs.jsonl"
    rows = [{"id": "a", "text": DOCS[0]}, {"id": "b", "text": DOCS[2], "source": "fr", "target": "Spanish"}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    output = tmp_path / "out.jsonl"
    args = ["translate", models["nllb"], "--target", "de", "--source", "en", "--input", str(source),
            "--output", str(output), "--prompt-field", "text", "--max-new-tokens", str(NEW), "--no-progress"]
    assert main(args) in (0, None)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    assert [(r["source"], r["target"], r["pieces"]) for r in records] == [("eng_Latn", "deu_Latn", 2),
                                                                          ("fra_Latn", "spa_Latn", 3)]
    gen = _gen(models["nllb"])
    expected = gen.translate([DOCS[0], DOCS[2]], target=["de", "es"], source=["en", "fr"], max_new_tokens=NEW,
                             show_progress_bar=False)
    assert [r["answer"] for r in records] == [t.text for t in expected]
    # rerun: everything from the store
    assert main(args) in (0, None)
    # a language the model lacks: a usage error naming the close ones, before any record is read
    bad = tmp_path / "bad.jsonl"
    assert main([*args[:3], "Germn", *args[4:9], str(bad), *args[10:]]) == 2
    assert not bad.exists()
    with sqlite3.connect(f"{output}.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 5


def test_app_translate_tab_logic(models, tmp_path, llama_path):
    from simple_generation.app import run_translation, translate_text, translation_choices

    gen = _gen(models["nllb"])
    choices, free = translation_choices(gen)
    assert dict((value, label) for label, value in choices)["deu_Latn"].startswith("German")
    assert len(choices) == 202 and not free  # NLLB's 202 codes
    assert translation_choices(_gen(llama_path))[1] is True  # an LLM: any language typed in
    text = translate_text(gen, "Hello world!", "deu_Latn", "eng_Latn", NEW)
    assert text.text == gen.translate("Hello world!", target="de", source="en", max_new_tokens=NEW,
                                      show_progress_bar=False).text
    upload = tmp_path / "docs.jsonl"
    upload.write_text(json.dumps({"text": DOCS[0]}) + "\n" + json.dumps({"text": "Hi.", "target": "fra_Latn"}) + "\n")
    output, rows = run_translation(gen, upload, "deu_Latn", "eng_Latn", NEW, tmp_path / "cache")
    assert [(r["target"], r["pieces"]) for r in rows] == [("deu_Latn", 2), ("fra_Latn", 1)]
    assert len(output.read_text().splitlines()) == 2
    _, again = run_translation(gen, upload, "deu_Latn", "eng_Latn", NEW, tmp_path / "cache")
    assert [r["answer"] for r in again] == [r["answer"] for r in rows]
    assert gen.last_run.cached == 1  # the second window's one call: every piece from the store


def test_app_has_a_translate_tab(models):
    pytest.importorskip("gradio")
    from simple_generation.app import build_app

    demo = build_app(_gen(models["m2m100"]))
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"tab-translate", "translate-source", "translate-target", "translate-text", "translate-file"} <= ids
