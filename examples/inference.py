"""Generate answers for a list of prompts: the same script on one process, or data parallel on many.

    # one process (one GPU, or the CPU)
    python examples/inference.py meta-llama/Llama-2-7b-chat-hf --chat-template

    # one copy of the model per GPU, prompts split across them (4 GPUs of one node)
    accelerate launch --multi_gpu --num_processes 4 examples/inference.py meta-llama/Llama-2-7b-chat-hf --chat-template

    # without a GPU or a hub download: a tiny random model, 2 CPU processes
    python -m simple_generation.tiny /tmp/tiny-llama
    accelerate launch --multi_gpu --num_processes 2 examples/inference.py /tmp/tiny-llama --max-new-tokens 16

Every process returns the complete list of answers, in input order; only the main process prints.
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json

from simple_generation import SimpleGenerator

TEXTS = [
    "Write a poem in the style of Leonardo Da Vinci",
    "Tell me what's 2 + 2.",
    "Translate the following sentence to Spanish: I went to the supermarket to buy a lighter.",
    "What kind of noises did dinosaurs make?",
    "What is the most popular programming language?",
    "Tell me how to make a cake.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="meta-llama/Llama-2-7b-chat-hf", help="hub id or local folder")
    parser.add_argument("--chat-template", action="store_true",
                        help="format prompts with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the prompt list (for timing)")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--output", help="write JSONL {index, prompt, answer} here (main process only)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--no-emissions", action="store_true", help="don't write emissions.csv")
    args = parser.parse_args()

    texts = TEXTS * args.repeat
    gen = SimpleGenerator(args.model, apply_chat_template=args.chat_template, track_emissions=not args.no_emissions)
    responses = gen(
        texts,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        skip_prompt=True,
        show_progress_bar=not args.quiet,
        batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size),
    )
    assert len(responses) == len(texts)  # on every process: each one gets all the answers back

    if gen.distribution.is_main:
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                for index, (prompt, answer) in enumerate(zip(texts, responses)):
                    out.write(json.dumps({"index": index, "prompt": prompt, "answer": answer},
                                         ensure_ascii=False) + "\n")
        elif not args.quiet:
            for prompt, answer in zip(texts, responses):
                print(f"### {prompt}\n{answer.strip()}\n")
        run = gen.last_run
        print(f"{run.prompts} prompts, {run.generated_tokens} tokens in {run.wall_time_s:.2f}s "
              f"({run.tokens_per_second:.1f} tokens/s) on {gen.distribution.world_size} process(es)")


if __name__ == "__main__":
    main()
