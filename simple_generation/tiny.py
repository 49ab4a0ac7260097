"""Build tiny random checkpoints on disk, with a tokenizer trained locally, for offline tries and tests.

The folder it writes loads with ``from_pretrained(path)`` like any hub checkpoint, so
``SimpleGenerator(path)`` runs the same code a hub id does.

The build is deterministic: the same options and ``seed`` write byte-identical files (so a rebuilt
checkpoint keeps its identity in a result store). From the command line, a ``PATH`` that already holds a
checkpoint is kept as it is (``--force`` rebuilds it), so a script that builds and then runs a job can
be rerun and resume.

Example:
    $ python -m simple_generation.tiny /tmp/tiny-llama --arch llama
    $ simple-generation run /tmp/tiny-llama --prompt "Hello" --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Tell me what is two plus two? Two plus two is four. Translate this sentence to Spanish, please.
Write a poem in the style of Leonardo da Vinci about the sea, the sky and the mountains at dawn.
The library runs text generation over checkpoints: give it a model and a list of prompts.
Researchers evaluate models on thousands of prompts, and engineers generate data for training.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # % & *
Unicode: caffè, naïve, über, señor, 你好, こんにちは, привет, 🙂.
Once upon a time there was a small model that learned to answer questions politely and briefly.
What kind of noises did dinosaurs make? What is the most popular programming language?
"""

ARCHITECTURES = ("llama", "gpt2", "t5", "bart")


def _train_tokenizer(arch: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "bart": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    }[arch]
    special_tokens = list(dict.fromkeys(
        ([specials["pad_token"]] if "pad_token" in specials else []) + list(specials.values())
    ))
    tokenizer = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    if arch == "llama":
        bos = specials["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    elif arch == "bart":
        bos, eos = specials["bos_token"], specials["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
        )
    elif arch == "t5":
        eos = specials["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def _model_config(arch: str, tokenizer, hidden: int, layers: int, heads: int, context: int, init: float):
    from transformers import BartConfig, GPT2Config, LlamaConfig, T5Config

    vocab = len(tokenizer)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 if hidden < 512 else hidden * 8 // 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=context, initializer_range=init,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
            initializer_range=init, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    if arch == "bart":  # learned absolute positions in the encoder: padding on the wrong side shows
        return BartConfig(
            vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=hidden * 4,
            decoder_ffn_dim=hidden * 4, max_position_embeddings=context, init_std=init,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_bos_token_id=None, forced_eos_token_id=None,
        )
    return T5Config(
        vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 4, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, initializer_factor=init * 50,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 256,
    vocab_size: int = 600,
    init: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a random-init ``arch`` model and its locally trained tokenizer to ``path``; return the path.

    ``init`` is larger than the usual 0.02 so that logits are well separated and greedy decoding is not
    decided by rounding noise.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}.")
    path = Path(path)
    tokenizer = _train_tokenizer(arch, vocab_size)
    config = _model_config(arch, tokenizer, hidden, layers, heads, context, init)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if arch in ("t5", "bart") else AutoModelForCausalLM
    model = auto.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    # Written beside PATH, then moved in with config.json last: a build killed half-way never leaves a
    # folder that `holds_checkpoint` would take for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        if (path / "config.json").exists():
            os.unlink(path / "config.json")
        for name in names:
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def holds_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a finished checkpoint: a config, weights and a tokenizer."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "tokenizer_config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


# config.json keys of the builder's options, per architecture: hidden, layers, heads, context
_OPTION_KEYS = {
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_positions"),
    "t5": ("d_model", "num_layers", "num_heads", None),
    "bart": ("d_model", "encoder_layers", "encoder_attention_heads", "max_position_embeddings"),
}


def _mismatches(path: Path, arch: str, options: dict[str, int]) -> list[str]:
    """How the checkpoint at ``path`` differs from what these options would build (its config.json)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["an unreadable config.json"]
    if config.get("model_type") != arch:
        return [f"architecture {config.get('model_type')!r}, not {arch!r}"]
    out = []
    for (name, wanted), key in zip(options.items(), _OPTION_KEYS[arch]):
        if key is not None and config.get(key) != wanted:
            out.append(f"{name} {config.get(key)}, not {wanted}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a tiny random checkpoint with a locally trained tokenizer. Deterministic: the same "
                    "options and --seed write byte-identical files. A PATH that already holds a checkpoint is "
                    "kept (use --force to rebuild it).")
    parser.add_argument("path")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if PATH already holds a checkpoint")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not args.force and holds_checkpoint(path):
        options = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "context": args.context}
        differences = _mismatches(path, args.arch, options)
        if differences:
            parser.exit(2, f"{path} already holds another checkpoint ({'; '.join(differences)}): pass --force "
                           "to replace it, or choose another path.\n")
        print(f"{path}: a checkpoint exists, kept (--force rebuilds it; its --seed is not checked)",
              file=sys.stderr)
        return
    out = build_tiny_checkpoint(path, args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                context=args.context, seed=args.seed)
    print(f"{out}: built", file=sys.stderr)


if __name__ == "__main__":
    main()
