"""Command line: ``simple-generation run MODEL --input FILE --output FILE`` (and ``dedup``, ``chat``).

``simple-generation MODEL ...`` (no subcommand) is ``run``. Arguments are checked before anything heavy is
imported; torch and transformers load only once a model is really needed. Exit codes: 0 done; 1 runtime
error (model not found, ...); 2 usage or input error (nothing was loaded, the output untouched); 3 finished,
but some prompts failed (their records carry the error); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
``run``'s generation defaults are :data:`simple_generation.defaults.BATCH_DEFAULTS` (greedy, answer only).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .defaults import BATCH_DEFAULTS
from .errors import Terminated as _Terminated
from .errors import UsageError

SUBCOMMANDS = ("run", "dedup", "chat", "score", "translate")
EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143
# Options users type from other tools, and ours (argparse's own suggestions come with Python 3.14).
_OPTION_ALIASES = {"--max-tokens": "--max-new-tokens", "--max-length": "--max-new-tokens",
                   "--max-completion-tokens": "--max-new-tokens", "--n": "--num-return-sequences",
                   "--stop": "--generation stop_strings=...", "--model": "MODEL (the first argument)"}
_ALL_OPTIONS: set[str] = set()
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

logger = logging.getLogger("simple_generation")


# ---------------------------------------------------------------------------------------------- argument types
def _integer_at_least(low: int | None):
    """An argparse type: an integer, at least ``low`` (any integer when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer{f' >= {low}' if low is not None else ''}, "
                                             f"got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive_int = _integer_at_least(1)
_non_negative_int = _integer_at_least(0)
_integer = _integer_at_least(None)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a positive integer or "auto", got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer or "auto", got {value}')
    return value


def _float_in(low: float, high: float | None, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value:
            bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bound}, got {text}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (e.g. repetition_penalty=1.1), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string: --generation stop_strings=END is fine
    return key, value


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return _DTYPE_ALIASES.get(text, text)


# ---------------------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, but not the uninformative ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        if message.startswith("unrecognized arguments:"):
            hints = [f"{option}: did you mean {hint}?" for option in message.split(":", 1)[1].split()
                     if (hint := _suggest_option(option))]
            if hints:
                message += "; " + "; ".join(hints)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _suggest_option(option: str) -> str | None:
    """The option meant by a mistyped ``--option`` (``--max-tokens`` -> ``--max-new-tokens``), or None."""
    if not option.startswith("--"):
        return None
    name = option.split("=", 1)[0]
    if name in _OPTION_ALIASES:
        return _OPTION_ALIASES[name]
    close = difflib.get_close_matches(name, sorted(_ALL_OPTIONS), n=1, cutoff=0.75)
    return close[0] if close else None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("model", help="hub id or local folder of the checkpoint")
    group.add_argument("--tokenizer", metavar="PATH", help="tokenizer hub id or folder, when not beside the model")
    group.add_argument("--revision", help="model revision on the hub (branch, tag or commit)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    group.add_argument("--dtype", type=_dtype, metavar="|".join(DTYPES[:5]),
                       help="weights dtype; auto = the checkpoint's own")
    group.add_argument("--device", help="e.g. cpu, cuda, cuda:1, mps (default: chosen for you)")
    group.add_argument("--device-map", help='e.g. "auto": spread the model over the GPUs')
    group.add_argument("--engine", help="generation engine by name (default: the library's choice)")
    group.add_argument("--fast-engine-after", type=_float_in(0, None), metavar="SECONDS",
                       help="with the default engine: move greedy calls (windows) to an installed OpenVINO/vLLM "
                            "whenever their estimated HF time is at least this (0: always; inf: never)")
    group.add_argument("--lora", metavar="PATH", help="PEFT LoRA adapter: folder or hub id")
    group.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit (CUDA)")
    group.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (CUDA)")
    group.add_argument("--gguf-file", help="GGUF file name inside the model folder or repo")
    group.add_argument("--compile", action="store_true", help="static KV cache + torch.compile")
    group.add_argument("--system-prompt", metavar="NAME", help="named chat template, e.g. llama-2, vicuna_v1.1")
    group.add_argument("--system-message", help="system message for the template")
    group.add_argument("--chat-template", action="store_true", help="use the tokenizer's own chat template")
    group.add_argument("--reasoning-markers", nargs="+", metavar="MARKER",  # feature: reasoning
                       help='reasoning models: each answer\'s reasoning block goes to the records\' `reasoning` field: '
                            '"auto" (default: <think> </think> when the tokenizer has them), "none" (off), or '
                            'OPENING CLOSING')
    group.add_argument("--no-emissions", action="store_true", help="don't write emissions.csv")
    group.add_argument("--emissions-dir", default=".", help="where emissions.csv goes")
    group.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    group.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_input_options(group: argparse._ArgumentGroup, *, stdin_help: str = "- for stdin") -> None:
    group.add_argument("--input-format", choices=("txt", "jsonl", "json", "csv", "parquet", "dataset"),
                       help="input format (default: from the extension; sniffed for stdin)")
    group.add_argument("--prompt-field", metavar="NAME",
                       help='field holding the prompt (default: "prompt", else "text", else "messages")')
    group.add_argument("--messages-field", metavar="NAME", help="field holding chat message lists")
    group.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N records (at least 1)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="simple-generation", formatter_class=_HelpFormatter,
        description="Batched text generation over HuggingFace checkpoints, for a few prompts or big files.\n\n"
                    "  simple-generation run MODEL --input prompts.jsonl --output answers.jsonl\n"
                    "  simple-generation MODEL --prompt 'Hello'          (same as run)\n"
                    "  simple-generation dedup prompts.jsonl --threshold 0.9\n"
                    "  simple-generation chat MODEL --port 7860\n"
                    "  simple-generation score MODEL --input pairs.jsonl --output scores.jsonl",
        epilog="Exit codes: 0 done, 1 runtime error, 2 usage/input error (nothing loaded), 3 some prompts failed "
               "(see their records), 130 interrupted, 143 terminated (rerun the same command to resume).",
    )
    parser.add_argument("--version", action="version", version=f"simple-generation {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,dedup,chat,score,translate}", parser_class=_Parser)

    run = commands.add_parser("run", help="generate answers for prompts or a file (the default command)",
                              formatter_class=_HelpFormatter,
                              description="Generate one output record per prompt, in input order. With --output, "
                                          "finished answers go to a store (<output>.sqlite): a rerun of the same "
                                          "command resumes where it stopped.")
    _add_model_options(run)
    io_group = run.add_argument_group("input and output")
    io_group.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    io_group.add_argument("--input", metavar="FILE",
                          help="prompts: .txt, .jsonl, .json, .csv, .parquet, a datasets folder, or - for stdin; "
                               "OpenAI Batch request lines are recognised")
    _add_input_options(io_group)
    io_group.add_argument("--output", metavar="FILE", help="where the records go (default: stdout)")
    io_group.add_argument("--output-format", choices=("jsonl", "csv", "parquet", "openai-batch"),
                          help="output format (default: from the --output extension, else jsonl)")
    io_group.add_argument("--store", metavar="PATH",
                          help="SQLite store of finished answers (default: <output>.sqlite when --output is given)")
    io_group.add_argument("--no-store", action="store_true", help="keep no store (a rerun starts over)")
    io_group.add_argument("--dry-run", action="store_true",
                          help="validate the whole input and report counts, token lengths, duplicates and the store; "
                               "load no model")
    io_group.add_argument("--on-error", choices=("record", "raise"), default="record",
                          help="record: a prompt that fails gets an error in its record and the job goes on "
                               "(exit code 3); raise: stop at the first failure")
    io_group.add_argument("--near-dedup", type=_float_in(0, 1, low_open=True), metavar="T",
                          help="skip prompts whose MinHash similarity to an earlier one is >= T (needs datasketch); "
                               "their records say duplicate_of")
    io_group.add_argument("--window-size", type=_positive_int, default=10_000, metavar="N",
                          help="records read and generated at a time (memory stays flat)")
    io_group.add_argument("--allow-remote-images", action="store_true",
                          help="vision-language models: fetch images given as http(s) URLs (off: such a record "
                               "fails; local paths, data: URLs, base64 and bytes are always read)")

    gen = run.add_argument_group("generation")
    # max-new-tokens and temperature default to None so that --generation may set them; the value used is
    # BATCH_DEFAULTS' (see _generation_kwargs), shown in the help
    gen.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                     help="most new tokens per answer, capped to the room left in the model's context "
                          f"(default: {BATCH_DEFAULTS.max_new_tokens})")
    gen.add_argument("--temperature", type=_float_in(0, None),
                     help=f"0: greedy decoding; above 0: sampling (default: {BATCH_DEFAULTS.temperature:g}, greedy)")
    gen.add_argument("--top-p", type=_float_in(0, 1, low_open=True),
                     help=f"nucleus sampling, only when sampling (default: {BATCH_DEFAULTS.top_p})")
    gen.add_argument("--top-k", type=_non_negative_int,
                     help=f"top-k sampling, only when sampling (default: {BATCH_DEFAULTS.top_k})")
    gen.add_argument("--num-beams", type=_positive_int, help="beam search (default: 1, no beams)")
    gen.add_argument("-n", "--num-return-sequences", type=_positive_int, metavar="N",
                     help="answers per prompt (answer becomes a list; needs sampling or beams; default: 1)")
    gen.add_argument("--seed", type=_integer,
                     help="sampling seed: an answer depends only on (prompt, parameters, seed) (default: none, "
                          "torch's global generator)")
    # feature: logprobs
    gen.add_argument("--logprobs", type=_non_negative_int, metavar="K",
                     help="write each generated token's log-probability and the K most likely alternatives "
                          "(0: the chosen token's only) into the records' `logprobs` field")
    gen.add_argument("--prompt-logprobs", type=_non_negative_int, metavar="K",
                     help="the same for the prompt's tokens (`prompt_logprobs` field)")
    gen.add_argument("--generation", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="any other generation setting, the value parsed as JSON (repeatable), "
                          "e.g. repetition_penalty=1.1")
    gen.add_argument("--skip-prompt", action=argparse.BooleanOptionalAction, default=BATCH_DEFAULTS.skip_prompt,
                     help="the answer holds only the continuation; --no-skip-prompt puts the prompt in front")
    gen.add_argument("--truncate-prompts", action="store_true",
                     help="keep the end of prompts longer than the context instead of failing them")
    gen.add_argument("--batch-size", type=_batch_size, default="auto", help='an integer or "auto"')
    gen.add_argument("--starting-batch-size", type=_positive_int, help='first batch size tried by "auto"')

    cluster = run.add_argument_group("cluster (Ray)")
    cluster.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help='run over a Ray cluster (ADDRESS: "auto" for the running one, ray://host:10001, '
                              'host:6379; no ADDRESS: start a local Ray)')
    cluster.add_argument("--replicas", type=_positive_int, help="Ray actors, each holding one model (default 1)")
    cluster.add_argument("--gpus-per-replica", type=_float_in(0, None), help="GPUs per Ray actor (default 0)")
    run.set_defaults(func=cmd_run)

    dedup = commands.add_parser("dedup", help="report near-duplicate prompts of a file (MinHash, needs datasketch)",
                                formatter_class=_HelpFormatter,
                                description="Write one JSONL line per near-duplicate record: its index, the index of "
                                            "the earlier record it duplicates, and both sources.")
    dedup.add_argument("input", help="prompts file (any input format) or - for stdin")
    options = dedup.add_argument_group("options")
    _add_input_options(options)
    options.add_argument("--threshold", type=_float_in(0, 1, low_open=True), default=0.9,
                         help="MinHash Jaccard similarity at which a record is a near-duplicate")
    options.add_argument("--num-perm", type=_positive_int, default=128, help="MinHash permutations")
    options.add_argument("--shingle", type=_positive_int, default=5, help="characters per shingle")
    options.add_argument("--output", metavar="FILE", help="the report (default: stdout)")
    options.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    dedup.set_defaults(func=cmd_dedup)

    chat = commands.add_parser("chat", help="serve a chat UI for a model", formatter_class=_HelpFormatter)
    _add_model_options(chat)
    web = chat.add_argument_group("server")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on")
    web.add_argument("--port", type=_positive_int, default=7860, help="port to listen on")
    web.add_argument("--share", action="store_true", help="also make a public share link")
    web.add_argument("--max-upload-mb", type=float, default=25.0, metavar="MB",
                     help="largest file the batch tab accepts, in megabytes")
    web.add_argument("--allow-remote-images", action="store_true",
                     help="vision-language models: fetch images given as http(s) URLs")
    chat.set_defaults(func=cmd_chat)
    score = _add_score_parser(commands)
    translate = _add_translate_parser(commands)
    for command in (parser, run, dedup, chat, score, translate):
        for action in command._actions:
            _ALL_OPTIONS.update(o for o in action.option_strings if o.startswith("--"))
    return parser


def _with_subcommand(argv: list[str]) -> list[str]:
    """``simple-generation MODEL ...`` (the original form) means ``run MODEL ...``; a mistyped command
    followed by another positional argument (``rnu MODEL``) is a usage error naming the command meant."""
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    first = argv[0]
    close = difflib.get_close_matches(first, SUBCOMMANDS, n=1, cutoff=0.6)
    positional_follows = len(argv) == 1 or not argv[1].startswith("-")
    if close and positional_follows and not first.startswith("-") and not Path(first).expanduser().exists():
        raise UsageError(f"unknown command {first!r}, did you mean {close[0]!r}? (commands: {', '.join(SUBCOMMANDS)}; "
                         "or simple-generation MODEL ... for run)")
    return ["run", *argv]


# ---------------------------------------------------------------------------------------------- checks
def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name one file: the same inode when both exist, else the same resolved path
    (symlinks followed, relative paths made absolute, case folded where the system folds it)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return os.path.normcase(a.resolve()) == os.path.normcase(b.resolve())


def _is_sqlite(path: str | Path) -> bool:
    """Whether ``path`` is an existing file starting with SQLite's header (a store, or any database)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _check_writable(path: str, what: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file name.")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: the directory {parent} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{what} {path}: not writable here.")


def _local_model(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.exists() else None


def _check_model_options(args: argparse.Namespace) -> None:
    local = _local_model(args.model)
    looks_local = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
    if local is None and looks_local:
        raise UsageError(f"model folder {args.model} does not exist.")
    if args.gguf_file:
        gguf = Path(args.gguf_file).expanduser()
        if local is not None and local.is_dir():
            if not (local / args.gguf_file).is_file() and not gguf.is_file():
                found = sorted(p.name for p in local.glob("*.gguf"))
                raise UsageError(f"--gguf-file {args.gguf_file} is not in {args.model}"
                                 + (f" (it has: {', '.join(found)})." if found else " (it has no .gguf file)."))
        elif local is None and gguf.suffix.lower() != ".gguf":
            raise UsageError(f"--gguf-file {args.gguf_file}: expected a .gguf file name.")
    if args.lora and args.lora.startswith((".", "/", "~")) and not Path(args.lora).expanduser().exists():
        raise UsageError(f"--lora {args.lora} does not exist.")
    if args.load_in_8bit and args.load_in_4bit:
        raise UsageError("pass either --load-in-8bit or --load-in-4bit, not both.")
    if args.device and args.device_map:
        raise UsageError("pass either --device or --device-map, not both.")
    if args.device:
        kind = args.device.split(":", 1)[0]
        if kind not in ("cpu", "cuda", "mps", "xpu", "npu", "hpu", "meta") and not args.device.isdigit():
            raise UsageError(f"--device {args.device}: expected cpu, cuda, cuda:N, mps, ...")
        if kind == "cuda" or args.device.isdigit():
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: CUDA is not available on this machine "
                                 "(use --device cpu, or leave --device out).")
            index = int(args.device.split(":", 1)[1]) if ":" in args.device else None
            if index is not None and index >= torch.cuda.device_count():
                raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s).")
        if kind == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise UsageError("--device mps: MPS is not available on this machine.")


def _check_run(args: argparse.Namespace) -> None:
    if not args.prompt and not args.input:
        raise UsageError("No prompts: pass --prompt TEXT (repeatable) or --input FILE.")
    if args.input and args.input != "-":
        source = Path(args.input).expanduser()
        remote = args.ray is not None and "://" in args.input  # s3://, gs://...: Ray reads it, not this machine
        if not source.exists() and not remote:
            raise UsageError(f"--input {args.input}: no such file or folder.")
    if args.input == "-" and args.input_format == "dataset":
        raise UsageError("a datasets folder cannot come from stdin.")
    if args.output == "-":
        args.output = None
    if args.output:
        if args.input and args.input != "-" and _same_file(args.output, args.input):
            raise UsageError(f"--output {args.output} is the input file; refusing to overwrite it.")
        if _is_sqlite(args.output):
            raise UsageError(f"--output {args.output} is a SQLite database (a store?); refusing to overwrite it.")
        _check_writable(args.output, "--output")
    fmt = args.output_format
    if fmt is None and args.output:
        from .io.writers import output_format_for

        fmt = output_format_for(args.output)
    if fmt == "parquet" and not args.output:
        raise UsageError("parquet output needs --output FILE.parquet (not stdout).")
    if fmt == "parquet" and not _have("pyarrow"):
        raise UsageError("parquet output needs pyarrow: pip install pyarrow")
    if args.no_store and args.store:
        raise UsageError("pass either --store or --no-store.")
    if args.store:
        if args.input and args.input != "-" and _same_file(args.store, args.input):
            raise UsageError(f"--store {args.store} is the input file.")
        _check_writable(args.store, "--store")
    store = _store_path(args)
    if store and args.output:
        for suffix in ("", "-wal", "-shm", "-journal"):
            if _same_file(args.output, store + suffix):
                raise UsageError(f"--output {args.output} is the store{' ' + suffix[1:] + ' file' if suffix else ''} "
                                 f"({store}); give them different paths.")
    if args.near_dedup is not None and not _have("datasketch"):
        raise UsageError('--near-dedup needs datasketch: pip install -e ".[dedup]" in a clone of simple-generation')
    if args.replicas is not None and args.ray is None:
        raise UsageError("--replicas needs --ray.")
    if args.ray is not None:
        if _ray_reads_input(args):  # a folder or URI: Ray Data reads it, the job goes to cluster.generate_dataset
            if not args.output:
                raise UsageError("--ray with a folder or URI --input needs --output FILE.")
            unsupported = [flag for flag, value in (("--prompt", args.prompt), ("--dry-run", args.dry_run)) if value]
            if unsupported:
                raise UsageError(f"--ray with a folder or URI --input does not support {', '.join(unsupported)} "
                                 "(give a file).")
        if not _have("ray"):
            raise UsageError('--ray needs Ray: pip install -e ".[ray]" in a clone of simple-generation')
    keys = [key for key, _ in args.generation]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise UsageError(f"--generation {', '.join(sorted(duplicates))} given more than once.")
    _check_generation_keys(keys)
    _check_generation_values(dict(args.generation))
    _check_model_options(args)


def _ray_reads_input(args: argparse.Namespace) -> bool:
    """Whether --input is one only Ray reads (a folder, a glob, s3://...) rather than a file read here."""
    return bool(args.input) and args.input != "-" and not Path(args.input).expanduser().is_file()


def _check_generation_keys(keys: list[str]) -> None:
    """Unknown --generation keys fail here, before any model loads, with the name meant when one is close."""
    from .sampling_params import ALIASES, FIELD_NAMES, GENERATE_CALL_ARGS, GENERATION_CONFIG_FIELDS

    known = GENERATION_CONFIG_FIELDS | GENERATE_CALL_ARGS | set(FIELD_NAMES) | set(ALIASES)
    unknown = [key for key in keys if key not in known]
    if unknown:  # maybe a field of a newer transformers (or a bookkeeping one): ask it, only then
        from transformers import GenerationConfig

        config = GenerationConfig()
        unknown = [key for key in unknown if not hasattr(config, key)]
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        raise UsageError(f"--generation {key}: not a generation setting"
                         + (f"; did you mean {close[0]!r}?" if close else
                            " (GenerationConfig fields such as repetition_penalty, no_repeat_ngram_size, or "
                            "arguments of model.generate)."))


def _check_generation_values(values: dict[str, Any]) -> None:
    """--generation values, checked as the library checks a call's (SamplingParams: types, ranges, one name
    per setting); the values of other GenerationConfig fields are checked when the config is built."""
    from .sampling_params import SamplingParams

    try:
        for key, value in values.items():
            SamplingParams.from_dict({key: value}, f"--generation {key}")
        SamplingParams.from_dict(values, "--generation")  # two names of one setting
    except ValueError as err:
        raise UsageError(str(err)) from None


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- helpers
def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _generator_kwargs(args: argparse.Namespace, *, torch_dtype: bool = True) -> dict[str, Any]:
    """SimpleGenerator keywords from the model options (``torch_dtype=False``: the dtype as a string)."""
    kwargs: dict[str, Any] = dict(
        system_prompt=args.system_prompt, system_message=args.system_message, apply_chat_template=args.chat_template,
        track_emissions=not args.no_emissions, emissions_dir=args.emissions_dir, lora_weights=args.lora,
        compile_model=args.compile,
    )
    optional = {"device": args.device, "device_map": args.device_map, "tokenizer_name_or_path": args.tokenizer,
                "revision": args.revision, "gguf_file": args.gguf_file, "engine": args.engine,
                "fast_engine_after_s": getattr(args, "fast_engine_after", None)}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    for flag in ("trust_remote_code", "load_in_8bit", "load_in_4bit"):
        if getattr(args, flag):
            kwargs[flag] = True
    if getattr(args, "allow_remote_images", False):  # run and chat only
        kwargs["allow_remote_images"] = True
    markers = getattr(args, "reasoning_markers", None)  # feature: reasoning
    if markers is not None:
        if len(markers) == 1 and markers[0] in ("auto", "none"):
            kwargs["reasoning_markers"] = None if markers[0] == "none" else "auto"
        elif len(markers) == 2:
            kwargs["reasoning_markers"] = tuple(markers)
        else:
            raise UsageError('--reasoning-markers takes "auto", "none" or two markers (OPENING CLOSING), got '
                             f"{' '.join(markers)!r}.")
    if args.dtype:
        if args.dtype == "auto" or not torch_dtype:
            kwargs["dtype"] = args.dtype
        else:
            import torch

            kwargs["dtype"] = getattr(torch, args.dtype)
    return kwargs


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The run's generation keywords: the options, --generation, then BATCH_DEFAULTS for what neither set."""
    from .sampling_params import ALIASES

    values = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "num_beams": args.num_beams, "num_return_sequences": args.num_return_sequences}
    values.update(logprobs=getattr(args, "logprobs", None),  # feature: logprobs
                  prompt_logprobs=getattr(args, "prompt_logprobs", None))
    generation = {k: v for k, v in values.items() if v is not None}
    flags = set(generation)
    for key, value in args.generation:
        name = ALIASES.get(key, key)
        if name in flags:
            raise UsageError(f"--generation {key} repeats --{name.replace('_', '-')}.")
        generation[key] = value
    given = {ALIASES.get(key, key) for key in generation}
    if "max_new_tokens" not in given:
        generation["max_new_tokens"] = BATCH_DEFAULTS.max_new_tokens
    if not {"temperature", "do_sample"} & given:
        generation["temperature"] = BATCH_DEFAULTS.temperature
    return generation


def _print_invalid_records(report) -> None:
    """The invalid records a scan found (the first ones, then how many more), on stderr."""
    for line in report.errors:
        print(f"simple-generation: error: {line}", file=sys.stderr)
    more = report.error_count - len(report.errors)
    if more > 0:
        print(f"simple-generation: ... and {more} more invalid record(s).", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    _check_run(args)
    _setup_logging(args.quiet)
    generation = _generation_kwargs(args)
    _check_generation_combination(generation)
    if args.ray is not None and _ray_reads_input(args):
        return _run_ray(args, generation)  # a folder or URI only Ray reads: its records are checked one by one
    from .jobs import InputSource, dry_run, scan_source

    with InputSource(args.prompt, args.input, input_format=args.input_format, prompt_field=args.prompt_field,
                     messages_field=args.messages_field, limit=args.limit) as source:
        report, problems = scan_source(source)
        if report.error_count:
            _print_invalid_records(report)
            return EXIT_USAGE
        if args.dry_run:
            result = dry_run(source, report, problems, model=args.model, tokenizer=args.tokenizer,
                             revision=args.revision, trust_remote_code=args.trust_remote_code,
                             near_dedup=args.near_dedup, store=_store_path(args), output=args.output)
            for line in result.lines:
                print(line)
            return EXIT_USAGE if result.store_error or (problems and args.on_error == "raise") else 0
        if problems:
            _report_problems(problems, args.on_error)
            if args.on_error == "raise":
                return EXIT_USAGE
        if report.records == 0:
            logger.warning("%s: no prompts in the input; nothing to do.", args.input)
            if args.output:
                from .io import OrderedWriter

                OrderedWriter(args.output, args.output_format).close()
            return 0
        store = _open_store(args)  # checked before the output is touched and before the model loads
        try:
            return _generate(args, source, report.records, generation, store)
        finally:
            if store is not None:
                store.close()


def _store_path(args: argparse.Namespace) -> str | None:
    """The run's store path: --store, else ``<output>.sqlite`` beside a regular-file output (see
    :func:`simple_generation.jobs.store_path`)."""
    from .jobs import store_path

    return store_path(store=args.store, output=args.output, no_store=args.no_store)


def _check_generation_combination(generation: dict[str, Any]) -> None:
    """-n k under greedy decoding can only fail (after the model loads): say so now."""
    from .sampling_params import SamplingParams

    try:
        params = SamplingParams.from_dict(generation, "call")
    except ValueError as err:
        raise UsageError(str(err)) from None
    n = params.num_return_sequences or 1
    if n > 1 and not params.sampled and (params.num_beams or 1) < n:
        raise UsageError(f"-n {n} needs sampling (e.g. --temperature 0.7) or --num-beams >= {n}: greedy decoding "
                         "gives one answer per prompt.")


def _report_problems(problems: dict[int, tuple[str, str]], on_error: str) -> None:
    verb = "error" if on_error == "raise" else "warning"
    tail = ("" if on_error == "raise" else "; recorded as failed prompts, the others run")
    for where, problem in list(problems.values())[:20]:
        print(f"simple-generation: {verb}: {where}: {problem}", file=sys.stderr)
    more = len(problems) - 20
    print(f"simple-generation: {len(problems)} prompt(s) cannot be generated from"
          + (f" ({more} more not listed)" if more > 0 else "") + tail + ".", file=sys.stderr)


def _open_store(args: argparse.Namespace):
    """The run's store, opened and checked (SQLite integrity, ours, schema version), or None."""
    from .jobs import is_regular_target, open_store
    from .store import StoreError

    path = _store_path(args)
    if path is None and args.output and not args.no_store and not is_regular_target(args.output):
        logger.info("No store: --output %s is not a regular file (a rerun starts over; --store PATH keeps one).",
                    args.output)
    try:
        return open_store(path)
    except StoreError as err:
        raise UsageError(str(err)) from None


def _generate(args: argparse.Namespace, source, total: int, generation: dict[str, Any], store) -> int:
    """Load the model (here, or on Ray actors with --ray), then run the job."""
    from .generator import SimpleGenerator

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        if args.ray is not None:  # the same job, its generation on Ray actors (the store, the writer stay here)
            from .cluster import RayGenerator

            stack.callback(_exit_on_late_interrupt)
            generator = stack.enter_context(RayGenerator(
                args.model, replicas=args.replicas or 1, gpus_per_replica=args.gpus_per_replica or 0,
                address=None if args.ray == "local" else args.ray, show_progress=not args.quiet,
                chunk_size=args.batch_size if isinstance(args.batch_size, int) else None,
                **_generator_kwargs(args, torch_dtype=False)))
        else:
            generator = SimpleGenerator(args.model, **_generator_kwargs(args))
        return _run(args, generator, source, total, generation, store)


def _run(args: argparse.Namespace, generator, source, total: int, generation: dict[str, Any], store) -> int:
    from .io import OrderedWriter
    from .io.writers import output_format_for
    from .jobs import JobOptions, run_job

    is_main = getattr(getattr(generator, "distribution", None), "is_main", True)
    fmt = output_format_for(args.output, args.output_format)
    if fmt == "openai-batch" and not args.skip_prompt:
        logger.warning("--no-skip-prompt: OpenAI Batch output holds the continuation only (OpenAI's shape).")
    call = dict(generation)
    if args.seed is not None:
        call["seed"] = args.seed
    if args.starting_batch_size is not None:
        call["starting_batch_size"] = args.starting_batch_size
    if store is not None:
        logger.info("Store: %s (finished answers are kept there; rerun the same command to resume).", store.path)
    options = JobOptions(store=store, window_size=args.window_size, near_dedup=args.near_dedup,
                         on_error=args.on_error, skip_prompt=args.skip_prompt, output_format=fmt, generation=call,
                         batch_size=args.batch_size, truncate_prompts=args.truncate_prompts,
                         show_progress=not args.quiet, total=total)
    # the output is opened (an older one truncated) only now: every check passed and the model loaded
    writer = OrderedWriter(args.output, args.output_format, model=args.model) if is_main else None
    try:
        summary = run_job(generator, source, writer, options)
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()
        print(f"\nsimple-generation: interrupted; {writer.written if writer else 0} of {total} records written"
              + (f", finished answers are in {store.path}: rerun the same command to resume." if store else "."),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if writer is not None:
            writer.close()
    if not is_main:
        return 0
    logger.info("%d records -> %s: %d generated tokens in %.1fs (%.1f tokens/s); %d from the store, "
                "%d exact duplicates, %d near-duplicates, %d failed.", total, args.output or "stdout",
                summary.generated_tokens, summary.wall_time_s, summary.tokens_per_second, summary.cached,
                summary.deduplicated, summary.near_duplicates, summary.failed)
    if summary.failures:
        _report_failures(summary.failures, summary.failed, "; a rerun retries only those" if store else "")
        return EXIT_FAILED
    return 0


def _report_failures(failures: list[tuple[int, str, str]], count: int, note: str = "") -> None:
    """The failed prompts, one line each (the first 20 of ``count``): the local and the Ray path say the same."""
    print(f"simple-generation: {count} prompt(s) failed (their records carry the error{note}):", file=sys.stderr)
    for index, where, error in failures[:20]:
        print(f"  record {index} ({where}): {error.splitlines()[0] if error else error}", file=sys.stderr)
    if count > 20:
        print(f"  ... and {count - 20} more", file=sys.stderr)


def _run_ray(args: argparse.Namespace, generation: dict[str, Any]) -> int:
    """A folder, glob or URI only Ray reads: the job (the same run_job, the same store) is generate_dataset's."""
    from .cluster import generate_dataset

    options: dict[str, Any] = dict(generation)
    for key in ("skip_prompt", "truncate_prompts"):
        if getattr(args, key):
            options[key] = True
    if args.seed is not None:
        options["seed"] = args.seed
    try:
        summary = generate_dataset(
            args.input, args.model, args.output, replicas=args.replicas or 1,
            gpus_per_replica=args.gpus_per_replica or 0, address=None if args.ray == "local" else args.ray,
            output_format=args.output_format, input_format=args.input_format, ordered=True,
            prompt_field=args.prompt_field, messages_field=args.messages_field, on_error=args.on_error,
            model_kwargs=_generator_kwargs(args, torch_dtype=False), track_emissions=not args.no_emissions,
            emissions_dir=args.emissions_dir, show_progress=not args.quiet,
            store=False if args.no_store else args.store, limit=args.limit, near_dedup=args.near_dedup,
            **({"batch_size": args.batch_size} if isinstance(args.batch_size, int) else {}), **options,
        )
    finally:
        _exit_on_late_interrupt()
    if summary.errors:
        _report_failures(summary.failures, summary.errors)
        return EXIT_FAILED
    return 0


def _exit_on_late_interrupt() -> None:
    """After a Ray job, a Ctrl-C while the process exits (Ray's and others' atexit hooks) ends it with 130 and
    one line, instead of a KeyboardInterrupt traceback inside an atexit hook and exit code 0."""
    def interrupted(signum, frame):
        print("\nsimple-generation: interrupted.", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    with contextlib.suppress(ValueError):  # only the main thread sets handlers (main() run from a thread: skip)
        signal.signal(signal.SIGINT, interrupted)


def cmd_dedup(args: argparse.Namespace) -> int:
    if args.input != "-" and not Path(args.input).expanduser().exists():
        raise UsageError(f"{args.input}: no such file or folder.")
    if args.output:
        if args.input != "-" and _same_file(args.output, args.input):
            raise UsageError(f"--output {args.output} is the input file; refusing to overwrite it.")
        _check_writable(args.output, "--output")
    if not _have("datasketch"):
        raise UsageError('dedup needs datasketch: pip install -e ".[dedup]" in a clone of simple-generation')
    from .dedup import near_duplicates
    from .io import prompt_text, read_records

    records: list[tuple[int, str]] = []  # (index, source) of each record, for the report

    def texts():
        for record in read_records(args.input, input_format=args.input_format, prompt_field=args.prompt_field,
                                   messages_field=args.messages_field, limit=args.limit):
            records.append((record.index, record.source))
            yield prompt_text(record.prompt)

    found = near_duplicates(texts(), args.threshold, num_perm=args.num_perm, shingle=args.shingle)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for removed, kept in sorted(found.items()):
            out.write(json.dumps({"index": records[removed][0], "duplicate_of": records[kept][0],
                                  "source": records[removed][1], "duplicate_of_source": records[kept][1]},
                                 ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"simple-generation: {len(records)} records, {len(found)} near-duplicate(s) at threshold "
          f"{args.threshold}" + (f"; report in {args.output}" if args.output else ""), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- score (feature: scoring)
def _add_score_parser(commands) -> argparse.ArgumentParser:
    score = commands.add_parser(
        "score", help="log-likelihood of given continuations, or multiple choice", formatter_class=_HelpFormatter,
        description="One output record per input record, in order. A record with context and continuation gets "
                    "its score (logprob, token_logprobs, num_tokens, is_greedy); one with prompt and choices (a "
                    "list of strings) gets the best choice by sum (best), per token (best_per_token) and per byte "
                    "(best_per_byte), and every choice's score. With --output, scores go to a store "
                    "(<output>.sqlite): a rerun resumes.")
    _add_model_options(score)
    group = score.add_argument_group("input and output")
    group.add_argument("--input", metavar="FILE", required=True,
                       help="records: .jsonl, .json, .csv (choices as a JSON list), .parquet, a datasets folder, "
                            "or - for stdin")
    group.add_argument("--input-format", choices=("jsonl", "json", "csv", "parquet", "dataset"),
                       help="input format (default: from the extension; sniffed for stdin)")
    group.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N records (at least 1)")
    group.add_argument("--output", metavar="FILE", help="where the records go (default: stdout)")
    group.add_argument("--output-format", choices=("jsonl", "csv", "parquet"),
                       help="output format (default: from the --output extension, else jsonl)")
    group.add_argument("--store", metavar="PATH",
                       help="SQLite store of finished scores (default: <output>.sqlite when --output is given)")
    group.add_argument("--no-store", action="store_true", help="keep no store (a rerun starts over)")
    group.add_argument("--apply-template", action="store_true",
                       help="format each context with --system-prompt/--chat-template first (default: raw text)")
    group.add_argument("--batch-size", type=_batch_size, default="auto", help='an integer or "auto"')
    group.add_argument("--starting-batch-size", type=_positive_int, help='first batch size tried by "auto"')
    group.add_argument("--window-size", type=_positive_int, default=10_000, metavar="N",
                       help="records scored (and written) at a time")
    score.set_defaults(func=cmd_score)
    return score


def _score_item(where: str, raw: Any) -> tuple[str, list[str]] | tuple[str, str]:
    """(context, continuation) or (prompt, [choice, ...]) of one score record; InputError naming it."""
    from .io import InputError

    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected an object with context/continuation or prompt/choices, got "
                         f"{type(raw).__name__}.")
    if "context" in raw or "continuation" in raw:
        context, continuation = raw.get("context"), raw.get("continuation")
        if not isinstance(context, str) or not isinstance(continuation, str) or not continuation:
            raise InputError(f"{where}: context must be a string and continuation a non-empty string.")
        return context, continuation
    if "prompt" in raw and "choices" in raw:
        prompt, choices = raw["prompt"], raw["choices"]
        if isinstance(choices, str):  # a CSV cell
            try:
                choices = json.loads(choices)
            except ValueError:
                choices = None
        if not isinstance(prompt, str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) and c for c in choices):
            raise InputError(f"{where}: prompt must be a string and choices a non-empty list of non-empty strings.")
        return prompt, choices
    raise InputError(f"{where}: a score record needs context and continuation, or prompt and choices; its fields: "
                     f"{', '.join(map(str, raw)) or 'none'}.")


def cmd_score(args: argparse.Namespace) -> int:
    if args.input != "-" and not Path(args.input).expanduser().exists():
        raise UsageError(f"--input {args.input}: no such file or folder.")
    if args.output == "-":
        args.output = None
    if args.output:
        if args.input != "-" and _same_file(args.output, args.input):
            raise UsageError(f"--output {args.output} is the input file; refusing to overwrite it.")
        if _is_sqlite(args.output):
            raise UsageError(f"--output {args.output} is a SQLite database (a store?); refusing to overwrite it.")
        _check_writable(args.output, "--output")
    from .io.writers import output_format_for

    fmt = output_format_for(args.output, args.output_format)
    if fmt not in ("jsonl", "csv", "parquet"):
        raise UsageError(f"score writes jsonl, csv or parquet, not {fmt}.")
    if fmt == "parquet" and not args.output:
        raise UsageError("parquet output needs --output FILE.parquet (not stdout).")
    if args.no_store and args.store:
        raise UsageError("pass either --store or --no-store.")
    if args.store:
        _check_writable(args.store, "--store")
    _check_model_options(args)
    _setup_logging(args.quiet)
    from .io import InputError
    from .io.readers import read_rows

    items, errors = [], []
    try:
        for where, raw in read_rows(args.input, input_format=args.input_format, limit=args.limit):
            try:
                items.append((raw, _score_item(where, raw)))
            except InputError as err:
                errors.append(str(err))
    except InputError as err:
        errors.append(str(err))
    for line in errors[:20]:
        print(f"simple-generation: error: {line}", file=sys.stderr)
    if errors:
        return EXIT_USAGE
    store = _open_store(args)  # checked before the output is touched and before the model loads
    try:
        return _score(args, items, store, fmt)
    finally:
        if store is not None:
            store.close()


def _score(args: argparse.Namespace, items: list, store, fmt: str) -> int:
    from .generator import SimpleGenerator
    from .io import OrderedWriter
    from .scoring import choose_from

    generator = SimpleGenerator(args.model, **_generator_kwargs(args))
    options = {"batch_size": args.batch_size, "starting_batch_size": args.starting_batch_size, "store": store,
               "apply_template": args.apply_template, "show_progress_bar": not args.quiet}
    with OrderedWriter(args.output, fmt, model=args.model) as writer:
        for start in range(0, len(items), args.window_size):
            window = items[start:start + args.window_size]
            contexts, continuations = [], []
            for _, (context, rest) in window:
                for continuation in [rest] if isinstance(rest, str) else rest:
                    contexts.append(context)
                    continuations.append(continuation)
            scores = generator.score(contexts, continuations, **options) if contexts else []
            at = 0
            for offset, (raw, (_, rest)) in enumerate(window):
                if isinstance(rest, str):
                    result = scores[at].to_dict()
                    at += 1
                else:
                    choice = choose_from(scores[at:at + len(rest)], rest)
                    at += len(rest)
                    result = {"best": choice.best, "best_per_token": choice.best_per_token,
                              "best_per_byte": choice.best_per_byte, "logprobs": [s.logprob for s in choice.scores],
                              "scores": [s.to_dict() for s in choice.scores]}
                writer.add(start + offset, {"index": start + offset, **raw, **result})
    logger.info("%d records scored -> %s.", len(items), args.output or "stdout")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_model_options(args)
    _setup_logging(args.quiet)
    try:
        from .app import serve
    except ImportError as err:
        raise UsageError(f"the chat UI is not available: {err}") from None
    from .generator import SimpleGenerator

    generator = SimpleGenerator(args.model, **_generator_kwargs(args))
    serve(generator, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0


# ---------------------------------------------------------------------------------- translate (issue 25)
def _add_translate_parser(commands) -> argparse.ArgumentParser:
    translate = commands.add_parser(
        "translate", help="translate texts or a file (NLLB, M2M100, mBART-50, Marian, MADLAD/T5, any LLM)",
        formatter_class=_HelpFormatter,
        description="One output record per input record, in order: `answer` is the translation, `source`/`target` "
                    "the model's language codes, `pieces` how many sentences (or parts) it was cut into. A record's "
                    "own `source`/`target` fields win over --source/--target. With --output, translated pieces go "
                    "to a store (<output>.sqlite): a rerun resumes, mid-document.")
    _add_model_options(translate)
    languages = translate.add_argument_group("languages")
    languages.add_argument("--target", help="target language: a name, ISO code, BCP-47 tag or the model's code "
                                            "(needed unless every record has a `target` or the model is one "
                                            "Marian pair)")
    languages.add_argument("--source", help="source language (default: the tokenizer's or the pair's, else none)")
    languages.add_argument("--template", help="LLM translators: the prompt, with {source}, {target} and {text}")
    languages.add_argument("--no-split-sentences", action="store_true",
                           help="cut documents at line breaks only, not into sentences")
    languages.add_argument("--max-piece-tokens", type=_positive_int, metavar="N",
                           help="longest piece in tokens (default: the model's context, a third of it for LLMs)")
    io_group = translate.add_argument_group("input and output")
    io_group.add_argument("--prompt", action="append", default=[], help="a text to translate (repeatable)")
    io_group.add_argument("--input", metavar="FILE",
                          help="texts: .txt, .jsonl, .json, .csv, .parquet, a datasets folder, or - for stdin")
    _add_input_options(io_group)
    io_group.add_argument("--output", metavar="FILE", help="where the records go (default: stdout)")
    io_group.add_argument("--output-format", choices=("jsonl", "csv", "parquet"),
                          help="output format (default: from the --output extension, else jsonl)")
    io_group.add_argument("--store", metavar="PATH",
                          help="SQLite store of translated pieces (default: <output>.sqlite when --output is given)")
    io_group.add_argument("--no-store", action="store_true", help="keep no store (a rerun starts over)")
    io_group.add_argument("--on-error", choices=("record", "raise"), default="record",
                          help="record: a failing record gets an error and the job goes on (exit code 3); raise: stop")
    io_group.add_argument("--window-size", type=_positive_int, default=10_000, metavar="N",
                          help="records read and translated at a time")
    gen = translate.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                     help=f"most new tokens per piece (default: {BATCH_DEFAULTS.max_new_tokens})")
    gen.add_argument("--num-beams", type=_positive_int, help="beam search (default: 1, greedy)")
    gen.add_argument("--generation", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="any other generation setting, the value parsed as JSON (repeatable)")
    gen.add_argument("--batch-size", type=_batch_size, default="auto", help='an integer or "auto"')
    gen.add_argument("--starting-batch-size", type=_positive_int, help='first batch size tried by "auto"')
    gen.add_argument("--no-progress", dest="quiet_progress", action="store_true", help="no progress bar")
    # what `run`'s checks and job read, fixed for translation
    translate.set_defaults(func=cmd_translate, ray=None, replicas=None, near_dedup=None, dry_run=False,
                           skip_prompt=True, truncate_prompts=False, seed=None, temperature=None, top_p=None,
                           top_k=None, num_return_sequences=None, logprobs=None, prompt_logprobs=None)
    return translate


def cmd_translate(args: argparse.Namespace) -> int:
    _check_run(args)
    _setup_logging(args.quiet)
    generation = _generation_kwargs(args)
    _check_generation_combination(generation)
    if args.quiet_progress:
        args.quiet = True
    from .jobs import InputSource, scan_source

    with InputSource(args.prompt, args.input, input_format=args.input_format, prompt_field=args.prompt_field,
                     messages_field=args.messages_field, limit=args.limit) as source:
        report, problems = scan_source(source)
        if report.error_count:
            _print_invalid_records(report)
            return EXIT_USAGE
        if problems:
            _report_problems(problems, args.on_error)
            if args.on_error == "raise":
                return EXIT_USAGE
        store = _open_store(args)  # checked before the output is touched and before the model loads
        try:
            from .generator import SimpleGenerator
            from .translation import TranslationJob, TranslationSource, Translator

            generator = SimpleGenerator(args.model, **_generator_kwargs(args))
            try:
                translator = Translator(generator, args.template, args.max_piece_tokens)
                if args.target is not None:
                    translator.target_code(args.target)  # a wrong language fails before any record is read
                if args.source is not None:
                    translator.source_code(args.source)
            except ValueError as err:
                raise UsageError(str(err)) from None
            split = not args.no_split_sentences
            return _run(args, TranslationJob(translator, split),
                        TranslationSource(source, translator, args.target, args.source, split),
                        report.records, generation, store)
        finally:
            if store is not None:
                store.close()


# ---------------------------------------------------------------------------------------------- entry point
_TERMINATED: list[bool] = []  # set by the SIGTERM handler (the interruption may be caught and returned as 130)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    _TERMINATED.append(True)
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_interrupts():
    """Within the block, SIGTERM interrupts like Ctrl-C (only from the main thread, and only when nobody
    else handles SIGTERM: an application embedding main() keeps its own handler)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _with_subcommand(argv)
    except UsageError as err:
        print(f"simple-generation: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    _TERMINATED.clear()
    try:
        with _sigterm_interrupts():
            code = args.func(args)
        return EXIT_TERMINATED if code == EXIT_INTERRUPTED and _TERMINATED else code
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nsimple-generation: interrupted" + (" (SIGTERM)." if _TERMINATED else "."), file=sys.stderr)
        return EXIT_TERMINATED if _TERMINATED else EXIT_INTERRUPTED
    except UsageError as err:
        if debug:
            raise
        print(f"simple-generation: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - one line for users; --debug shows the traceback
        if debug:
            raise
        from .io import InputError

        code = EXIT_USAGE if isinstance(err, InputError) else EXIT_ERROR
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"simple-generation: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
