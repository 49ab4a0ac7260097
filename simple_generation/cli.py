"""Command line: ``simple-generation MODEL --prompt ... | --input FILE [--output FILE.jsonl]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _read_prompts(path: str) -> list[str]:
    """One prompt per line of a .txt file, or the "prompt" (or "text") field of each .jsonl line."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not ({"prompt", "text"} & record.keys()):
                    raise SystemExit(f"{path}:{number}: each JSONL line needs a \"prompt\" (or \"text\") field.")
                prompts.append(record.get("prompt", record.get("text")))
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simple-generation",
        description="Generate answers for a list of prompts with a HuggingFace checkpoint (hub id or folder).",
    )
    parser.add_argument("model", help="hub id or local folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--input", help="prompts file: .txt (one per line), .jsonl (\"prompt\" field) or - for stdin")
    parser.add_argument("--output", help="write JSONL records {index, prompt, answer} here (default: stdout)")
    parser.add_argument("--system-prompt", help="named chat template, e.g. llama-2, vicuna_v1.1")
    parser.add_argument("--system-message", help="system message for the template")
    parser.add_argument("--chat-template", action="store_true", help="use the tokenizer's own chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--batch-size", default="auto", help='an integer or "auto" (default)')
    parser.add_argument("--starting-batch-size", type=int, default=256)
    parser.add_argument("--skip-prompt", action="store_true", help="return only the continuation")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16, float16, float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--device-map", default=None, help='e.g. "auto"')
    parser.add_argument("--lora", help="PEFT LoRA adapter: folder or hub id")
    parser.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit (CUDA)")
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (CUDA)")
    parser.add_argument("--gguf-file", help="GGUF file name inside the model folder or repo")
    parser.add_argument("--compile", action="store_true", help="static KV cache + torch.compile")
    parser.add_argument("--no-emissions", action="store_true", help="don't write emissions.csv")
    parser.add_argument("--emissions-dir", default=".", help="where emissions.csv goes (default: .)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("simple_generation").setLevel(logging.WARNING if args.quiet else logging.INFO)
    prompts = list(args.prompt) + (_read_prompts(args.input) if args.input else [])
    if not prompts:
        raise SystemExit("No prompts: pass --prompt TEXT (repeatable) or --input FILE.")

    from .generator import SimpleGenerator  # heavy imports after argument errors

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    model_kwargs = {}
    if args.dtype:
        import torch

        model_kwargs["dtype"] = getattr(torch, args.dtype)
    if args.device_map:
        model_kwargs["device_map"] = args.device_map
    for flag in ("load_in_8bit", "load_in_4bit"):
        if getattr(args, flag):
            model_kwargs[flag] = True
    if args.gguf_file:
        model_kwargs["gguf_file"] = args.gguf_file
    generator = SimpleGenerator(
        args.model, device=args.device, system_prompt=args.system_prompt, system_message=args.system_message,
        apply_chat_template=args.chat_template, track_emissions=not args.no_emissions,
        emissions_dir=args.emissions_dir, lora_weights=args.lora, compile_model=args.compile, **model_kwargs,
    )
    generation = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                    "top_p": args.top_p, "num_beams": args.num_beams}.items() if v is not None}
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    answers = generator(prompts, batch_size=batch_size, starting_batch_size=args.starting_batch_size,
                        skip_prompt=args.skip_prompt, show_progress_bar=not args.quiet, **generation)
    if not generator.distribution.is_main:
        return 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for index, (prompt, answer) in enumerate(zip(prompts, answers)):
            out.write(json.dumps({"index": index, "prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    run = generator.last_run
    logging.getLogger("simple_generation").info(
        "%d prompts, %d tokens in %.1fs (%.1f tokens/s)", run.prompts, run.generated_tokens, run.wall_time_s,
        run.tokens_per_second)
    return 0


if __name__ == "__main__":
    sys.exit(main())
