"""Images in, text out on CPUs: time, answers and peak memory of image prompts, against plain HF one image at a time.

Two workloads (``--workload``):

* ``throughput`` (default): a random LLaVA-1.5-style checkpoint at a real but CPU-feasible shape, built once into
  ``--model-dir``: a CLIP ViT-B/32 vision tower (hidden 768, 12 layers, 12 heads, intermediate 3072, 224 px images
  in 32 px patches: 49 patches + CLS, 49 image tokens a prompt with the "default" feature strategy), a gelu
  projector, and SmolLM-135M's Llama text model (hidden 576, 30 layers, 9 heads, 3 KV heads, vocabulary 49152);
  a byte-level BPE trained locally and padded with added tokens to the vocabulary, ``<image>`` among them
  (``config.image_token_id``), a llava-1.5 chat template (``USER: <image>\\n... ASSISTANT:``), ``LlavaProcessor``
  with ``CLIPImageProcessor`` (224 px, PIL backend), ``patch_size=32``. No EOS in ``generation_config.json``, so
  every answer runs to ``--max-new-tokens``. ``--images`` distinct 512x512 pictures (``tests/vlm_models.py``'s
  ``make_image``) are written as PNG files to a temporary folder, each with a short question; the image is given
  by path, so every method reads and decodes its files inside the timing. Methods, each in its own process:

  - ``hf1``: plain HF, one image at a time: the processor's chat template, ``processor(text, images)``, greedy
    ``model.generate``;
  - ``ours1``: ``SimpleGenerator(model).generate(questions, images=paths, batch_size=1)``;
  - ``default``: the same with the default ``batch_size="auto"``.

  Columns: wall time of the call (after a warm-up on two other images), images per second, speed-up over ``hf1``
  in the same run, peak RSS of the process tree during the call (sampled every 5 ms) and after loading, the
  batch size the engine ran (``gen.last_run.batch_size``), how many answers equal ``hf1``'s token for token
  (all of them, or the batching is wrong), and how many distinct answers there are (the answers depend on the
  images and questions, so the comparison means something).

* ``memory``: ``--images`` (default 10000) 512x512 PNG files written one at a time to ``--data-dir`` (kept and
  reused by later runs: about 0.7 MB each, ~7 GB for 10000, written by one process per CPU core) and a JSONL file
  naming them by relative path (``{"prompt": ..., "image": "images-512/00042.png"}``); the CLI job
  ``simple-generation run MODEL --input F --output O --max-new-tokens 1`` runs on the tiny LLaVA of
  ``tests/vlm_models.py`` (``build_vlm("llava", ...)``) in a subprocess, at N/10 and at N images. Columns: images,
  wall time of the command (model loading included), images per second, peak RSS of the command's process tree
  (sampled every 20 ms), records written and records with an error. The two peaks should be about equal: a job
  holds one batch of pixels at a time, not its images.

    python benchmarks/vision.py                                     # throughput: 200 images, 16 new tokens
    python benchmarks/vision.py --images 40 --methods hf1 default   # a quicker look
    python benchmarks/vision.py --workload memory                   # 1000 and 10000 images (~7 GB in --data-dir)
    python benchmarks/vision.py --workload memory --images 200 --data-dir /tmp/sg-vision-data   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import MODELS, WORDS, PeakRSS, _tree_rss  # noqa: E402

from tests.vlm_models import CHAT_TEMPLATES, build_vlm, make_image, save_atomically  # noqa: E402

IMAGE_SIZE = (512, 512)
SUBJECTS = ("picture", "image", "photo", "scene", "color scheme", "background", "top left corner", "light",
            "texture", "gradient", "foreground", "border")
QUESTIONS = ("What is in this {}?", "Describe the {} briefly.", "What color is the {}?", "Is the {} bright or dark?",
             "Tell me about the {} in one sentence.", "How would you caption this {}?", "What stands out in the {}?",
             "Which direction does the {} fade?", "Name one thing about the {}.", "Is there noise in the {}?")
VISION = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(QUESTIONS).format(rng.choice(SUBJECTS)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- building
def build_llava(path: Path) -> Path:
    """The random LLaVA-1.5-style checkpoint of the module docstring at ``path`` (kept: built once)."""
    if (path / "config.json").exists() and (path / "processor_config.json").exists():
        return path
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    arch, fields = MODELS["smollm-135m"]
    vocab = fields["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = list(WORDS) + " ".join(QUESTIONS + SUBJECTS).replace("{}", "").split() + ["USER:", "ASSISTANT:"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(500)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(vocab - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])  # BOS, as Llama's tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens=["<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert tok.get_vocab_size() == vocab and image_token < vocab
    text = dict(model_type=arch, **fields, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = LlavaConfig(vision_config=VISION, text_config=text, image_token_id=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=49, pad_token_id=2)
    processor = LlavaProcessor(CLIPImageProcessorPil(), tokenizer, patch_size=32,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATES["llava"])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None   # every answer runs to its budget
    model.generation_config.pad_token_id = 2
    model.generation_config.bos_token_id = 0
    save_atomically(path, lambda folder: (processor.save_pretrained(folder), model.save_pretrained(folder)))
    return path


def _write_image(job: tuple[int, str]) -> None:
    seed, target = job
    if not os.path.exists(target):
        partial = f"{target}.{os.getpid()}.tmp"
        make_image(seed, IMAGE_SIZE).save(partial, format="PNG")
        os.replace(partial, target)  # a killed run leaves no truncated PNG behind


def write_images(folder: Path, n: int, processes: int, first_seed: int = 0) -> list[Path]:
    """``n`` PNG files ``folder/00000.png``... (image ``i`` from seed ``first_seed + i``); existing ones are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    todo = [(first_seed + i, str(p)) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"writing {len(todo)} images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} to {folder} ...", flush=True)
        if processes > 1:
            with ProcessPoolExecutor(processes) as pool:
                for _ in pool.map(_write_image, todo, chunksize=16):
                    pass
        else:
            for job in todo:
                _write_image(job)
    return paths


# ---------------------------------------------------------------------------------------------- throughput
def worker(model_dir: str, method: str, image_dir: str, n: int, max_new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    paths = [str(Path(image_dir) / f"{i:05d}.png") for i in range(n)]
    texts = questions(n)
    warm_paths = [str(Path(image_dir) / f"warm{i}.png") for i in range(2)]
    if method == "hf1":
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()

        def run(prompts, images, budget):
            answers = []
            with torch.inference_mode():
                for prompt, path in zip(prompts, images):
                    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                    with Image.open(path) as image:
                        inputs = processor(text=text, images=[image], return_tensors="pt")
                    out = model.generate(**inputs, max_new_tokens=budget, do_sample=False)
                    answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
            return answers, {"engine": "hf", "batch_size": 1}
    else:
        from simple_generation import SimpleGenerator

        gen = SimpleGenerator(model_dir, device="cpu", track_emissions=False)
        size = 1 if method == "ours1" else "auto"

        def run(prompts, images, budget):
            results = gen.generate(prompts, images=images, max_new_tokens=budget, temperature=0, skip_prompt=True,
                                   show_progress_bar=False, dedup=False, batch_size=size)
            return ([r.token_ids[0] if r.token_ids else [] for r in results],
                    {"engine": gen.last_run.engine, "batch_size": gen.last_run.batch_size})
    loaded = _tree_rss()
    run(["Warm up on this.", "And this one."], warm_paths, 2)   # first-call costs stay out of the timing
    with PeakRSS() as rss:
        start = time.perf_counter()
        answers, info = run(texts, paths, max_new_tokens)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "loaded_mb": loaded / 2**20, "peak_mb": rss.peak / 2**20, "answers": answers,
            "images": n, **info}


def throughput(args) -> list[dict]:
    model_dir = build_llava(Path(args.model_dir))
    image_dir = Path(tempfile.mkdtemp(prefix="sg-vision-images-"))
    rows = []
    try:
        write_images(image_dir, args.images, os.cpu_count() or 1)
        for i in range(2):  # warm-up pictures, not among the measured ones
            make_image(10**6 + i, IMAGE_SIZE).save(image_dir / f"warm{i}.png")
        results = {}
        for method in args.methods:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
            proc = subprocess.run([sys.executable, __file__, "--worker", str(model_dir), method, str(image_dir),
                                   str(args.images), str(args.max_new_tokens), str(args.threads)],
                                  capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                print(f"  {method}: failed ({tail})")
                continue
            results[method] = json.loads(line[len("RESULT "):])
    finally:
        shutil.rmtree(image_dir, ignore_errors=True)
    base = results.get("hf1")
    print(f"\n### throughput: {args.images} images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {args.max_new_tokens} new "
          f"tokens, {args.threads} threads (LLaVA-1.5 layout: CLIP ViT-B/32 + SmolLM-135M)\n")
    print("| method | engine | batch size | time (s) | images/s | vs hf1 | peak RSS (MB) | loaded (MB) "
          "| answers = hf1 | distinct answers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        same = sum(a == b for a, b in zip(r["answers"], base["answers"])) if base else None
        speed = base["seconds"] / r["seconds"] if base else float("nan")
        distinct = len({tuple(a) for a in r["answers"]})
        print(f"| {method} | {r['engine']} | {r['batch_size']} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.2f}"
              f" | {speed:.2f}x | {r['peak_mb']:.0f} | {r['loaded_mb']:.0f} | "
              f"{same if same is not None else '-'}/{len(r['answers'])} | {distinct} |")
        rows.append({"workload": "throughput", "method": method, "vs_hf1": speed, "same_as_hf1": same,
                     "distinct_answers": distinct, **{k: v for k, v in r.items() if k != "answers"}})
    if base:
        for method, r in results.items():
            first = next((i for i, (a, b) in enumerate(zip(r["answers"], base["answers"])) if a != b), None)
            if first is not None:
                print(f"  {method}: answer {first} differs from hf1's: {r['answers'][first]} vs "
                      f"{base['answers'][first]}")
    return rows


# ---------------------------------------------------------------------------------------------- memory
def run_job(command: list[str], env: dict, interval: float = 0.02) -> tuple[int, float, int, str]:
    """Run ``command``; its exit code, wall time, the peak RSS of its process tree, and its stderr's tail."""
    stderr = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    stderr.seek(0)
    tail = " | ".join(stderr.read().strip().splitlines()[-3:])[:400]
    return code, seconds, peak, tail


def memory(args) -> list[dict]:
    data = Path(args.data_dir)
    model = build_vlm("llava", Path(args.model_dir).parent / "tiny-llava")
    write_images(data / "images-512", args.images, os.cpu_count() or 1)
    cli = shutil.which("simple-generation")
    base = [cli] if cli else [sys.executable, "-c", "from simple_generation.cli import main; main()"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for n in sorted({max(1, args.images // 10), args.images}):
        records = data / f"images-{n}.jsonl"
        if not records.exists():
            with open(f"{records}.tmp", "w") as f:
                for i, text in enumerate(questions(n)):
                    f.write(json.dumps({"prompt": text, "image": f"images-512/{i:05d}.png"}) + "\n")
            os.replace(f"{records}.tmp", records)
        with tempfile.TemporaryDirectory(prefix="sg-vision-job-") as out:
            output = Path(out) / "answers.jsonl"   # a fresh store each run: nothing is resumed
            command = [*base, "run", model, "--input", str(records), "--output", str(output), "--max-new-tokens",
                       "1", "--quiet", "--no-emissions"]
            code, seconds, peak, tail = run_job(command, env)
            written = errors = 0
            if output.exists():
                with open(output) as f:
                    for line in f:
                        written += 1
                        errors += json.loads(line).get("error") is not None
        if code not in (0, 3):
            print(f"  {n} images: the job failed with exit code {code} ({tail})")
        rows.append({"workload": "memory", "images": n, "seconds": seconds, "peak_mb": peak / 2**20,
                     "exit_code": code, "records": written, "errors": errors})
    print(f"\n### memory: the CLI job on the tiny LLaVA, 512x512 PNG files, --max-new-tokens 1, {args.threads} "
          "threads\n")
    print("| images | time (s) | images/s | peak RSS (MB) | records | errors | exit code |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['records']} | {r['errors']} | {r['exit_code']} |")
    if len(rows) == 2:
        print(f"\npeak RSS at {rows[1]['images']} images / at {rows[0]['images']}: "
              f"{rows[1]['peak_mb'] / rows[0]['peak_mb']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["throughput", "memory"], default="throughput")
    parser.add_argument("--images", type=int, help="images (default: 200 for throughput, 10000 for memory)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="throughput: new tokens per answer")
    parser.add_argument("--methods", nargs="+", default=["hf1", "ours1", "default"],
                        choices=["hf1", "ours1", "default"], help="throughput: methods to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", default="/tmp/sg-vision/llava-clip-b32-smollm-135m",
                        help="where the random checkpoint is kept (the tiny LLaVA goes beside it)")
    parser.add_argument("--data-dir", default="/tmp/sg-vision/data", help="memory: the images and JSONL files, kept")
    parser.add_argument("--json", help="also write every measurement (without answers) to this file")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS,
                        metavar=("MODEL_DIR", "METHOD", "IMAGE_DIR", "N", "MAX_NEW_TOKENS", "THREADS"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        model_dir, method, image_dir, n, budget, threads = args.worker
        print("RESULT " + json.dumps(worker(model_dir, method, image_dir, int(n), int(budget), int(threads))))
        return
    if args.images is None:
        args.images = 200 if args.workload == "throughput" else 10_000
    rows = throughput(args) if args.workload == "throughput" else memory(args)
    sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
