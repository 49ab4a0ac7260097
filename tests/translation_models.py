"""Tiny random translation checkpoints built offline, with the real tokenizer classes and their language codes.

NLLB (``NllbTokenizer`` over a locally trained BPE; M2M100 architecture), M2M100 (``M2M100Tokenizer`` over a
locally trained SentencePiece model), mBART-50 (``MBart50Tokenizer`` over a SentencePiece vocabulary),
Marian (``MarianTokenizer``, an ``opus-mt-en-de`` folder name) and a MADLAD-style T5 (``<2xx>`` tokens).
Each is written to disk and loaded back with ``from_pretrained(path)``, as hub checkpoints are.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Der schnelle braune Fuchs springt über den faulen Hund. Eine Reise beginnt mit einem ersten Schritt.
Le renard brun saute par-dessus le chien paresseux. Bonjour, comment allez-vous aujourd'hui?
Tell me what is two plus two? Two plus two is four. Translate this sentence to Spanish, please.
Dr. Smith paid 3.50 dollars for the book on Monday. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Unicode: caffè, naïve, über, señor, привет. Once upon a time there was a small model.
""".splitlines()

SMALL = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 128,
         "init_std": 0.2, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def _spm(vocab_size: int = 180) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2,
                                   character_coverage=1.0)
    return model.getvalue()


def _vocab_size(tokenizer) -> int:
    ids = [*tokenizer.get_vocab().values(), *(getattr(tokenizer, "lang_code_to_id", None) or {}).values()]
    return max(len(tokenizer), max(ids) + 1)


def _save(model, tokenizer, path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _seq2seq(config_class, model_class, vocab_size: int, **config):
    import torch

    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=vocab_size, **config)).eval()
    model.generation_config.max_length = None
    return model


def build_nllb(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "<pad>", "</s>",
                                                                                          "<unk>"],
                                                            show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = NllbTokenizer(vocab=trained["vocab"], merges=merges, src_lang="eng_Latn")
    model = _seq2seq(M2M100Config, M2M100ForConditionalGeneration, _vocab_size(tokenizer), **SMALL, bos_token_id=0,
                     pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return _save(model, tokenizer, path)


def build_m2m100(path: Path) -> str:
    import sentencepiece as spm
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    data = _spm()
    (path / "sentencepiece.bpe.model").write_bytes(data)
    processor = spm.SentencePieceProcessor(model_proto=data)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = M2M100Tokenizer(str(path / "vocab.json"), str(path / "sentencepiece.bpe.model"), src_lang="en")
    model = _seq2seq(M2M100Config, M2M100ForConditionalGeneration, _vocab_size(tokenizer), **SMALL, bos_token_id=0,
                     pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return _save(model, tokenizer, path)


def build_mbart50(path: Path) -> str:
    import sentencepiece as spm
    from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

    processor = spm.SentencePieceProcessor(model_proto=_spm())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = MBart50Tokenizer(vocab=vocab, src_lang="en_XX")
    model = _seq2seq(MBartConfig, MBartForConditionalGeneration, _vocab_size(tokenizer), **SMALL, bos_token_id=0,
                     pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    return _save(model, tokenizer, path)


def build_marian(path: Path, targets: tuple[str, ...] = ()) -> str:
    """A Marian checkpoint; ``path``'s name carries the pair (``opus-mt-en-de``); ``targets`` adds ``>>xxx<<``
    tokens (a multi-target model)."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    path.mkdir(parents=True, exist_ok=True)
    data = _spm()
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes(data)
    processor = spm.SentencePieceProcessor(model_proto=data)
    vocab = {"</s>": 0, "<unk>": 1}
    for token in [f">>{t}<<" for t in targets] + [processor.id_to_piece(i) for i in range(processor.get_piece_size())]:
        vocab.setdefault(token, len(vocab))
    vocab["<pad>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"))
    pad = vocab["<pad>"]
    model = _seq2seq(MarianConfig, MarianMTModel, len(vocab), **SMALL, pad_token_id=pad, eos_token_id=0,
                     decoder_start_token_id=pad, forced_eos_token_id=0, scale_embedding=True)
    return _save(model, tokenizer, path)


def build_madlad(path: Path, t5_path: str) -> str:
    """The tiny T5 of the test fixtures with MADLAD's ``<2xx>`` target tokens added."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5_path)
    tokenizer.add_tokens(["<2de>", "<2fr>", "<2en>", "<2es>"])
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_path).eval()
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():  # the new rows random, as trained ones would be distinct
        model.get_input_embeddings().weight[-4:] = torch.randn(4, model.config.d_model) * 0.5
    return _save(model, tokenizer, path)
