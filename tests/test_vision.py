"""Images in, text out: image-text-to-text checkpoints through SimpleGenerator, against HF's unbatched generate.

Tiny random checkpoints of eight architectures are built offline with their real processor classes
(tests/vlm_models.py); images are made with PIL. Every batched greedy answer must equal HF's unbatched
``model.generate`` on the processor's output for the same (prompt, images), token for token.
"""

from __future__ import annotations

import base64
import io

import pytest

from simple_generation import ImageError, SimpleGenerator, SimpleVLMGenerator

from .vlm_models import KINDS, build_vlm, chat_text, hf_reference, make_image

NEW = 6
QUICK_KINDS = ("llava", "qwen2_vl")  # the others run in the slow tier


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlms")


def vlm(root, kind: str) -> str:
    return build_vlm(kind, root / kind)


@pytest.fixture(scope="session")
def llava(vlm_root):
    return vlm(vlm_root, "llava")


@pytest.fixture(scope="session")
def llava_gen(llava):
    return SimpleGenerator(llava, track_emissions=False)


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def reference(path: str, prompt: str, images: list) -> list[int]:
    text = chat_text(path, prompt, len(images)) if images else prompt
    return hf_reference(path, text, images, NEW)


def ids(result) -> list[int]:
    assert result.error is None, result.error
    return result.outputs[0].token_ids


def mixed_job(kind: str):
    """Prompts with one image of several sizes, two images, and none (where the model can go without)."""
    a, b, c, d = make_image(1), make_image(2, (64, 64)), make_image(3, (30, 50)), make_image(4, (80, 40))
    prompts = ["What is this?", "Describe the picture.", "Count the colors please.", "Compare the two pictures.",
               "Tell me a story without any picture.", "Caption."]
    images = [a, b, c, [d, b], None, [a]]
    if kind in ("paligemma", "blip2"):  # one image per prompt, and never none
        images = [a, b, c, d, b, [a]]
    return prompts, images


@pytest.mark.parametrize("kind", [pytest.param(k, marks=() if k in QUICK_KINDS else pytest.mark.slow) for k in KINDS])
def test_batched_greedy_answers_equal_unbatched_hf(kind, vlm_root):
    from simple_generation.vision import CONTINUOUS_IMAGE_TYPES

    path = vlm(vlm_root, kind)
    prompts, images = mixed_job(kind)
    expected = [reference(path, prompt, [] if found is None else found if isinstance(found, list) else [found])
                for prompt, found in zip(prompts, images)]
    default = SimpleGenerator(path, track_emissions=False)  # engine="auto"
    results = default.generate(prompts, images=images, max_new_tokens=NEW, temperature=0, skip_prompt=True)
    model_type = default.config.model_type
    assert default.last_run.engine == ("continuous" if model_type in CONTINUOUS_IMAGE_TYPES else "static")
    assert [ids(r) for r in results] == expected, kind
    static = SimpleGenerator(path, engine="static", track_emissions=False)
    batched = static.generate(prompts, images=images, max_new_tokens=NEW, temperature=0, skip_prompt=True,
                              batch_size=8)
    assert static.last_run.batches == 1  # one batch held every row
    assert [ids(r) for r in batched] == expected, kind
    # the same answers one prompt at a time
    single = static.generate(prompts, images=images, max_new_tokens=NEW, temperature=0, skip_prompt=True,
                             batch_size=1)
    assert [ids(r) for r in single] == expected, kind


def test_image_parts_and_data_urls_are_the_same_prompt_as_images(llava, llava_gen, tmp_path):
    image = make_image(7, (50, 44))
    path = tmp_path / "picture.png"
    image.save(path)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    question = "What is in the picture?"
    expected = reference(llava, question, [image])
    forms = [
        ([question], {"images": [image]}),
        ([question], {"images": [str(path)]}),
        ([[{"role": "user", "content": [{"type": "image", "image": str(path)},
                                        {"type": "text", "text": question}]}]], {}),
        ([[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}]], {}),
        ([[{"role": "user", "content": [{"type": "image", "image": png_bytes(image)},
                                        {"type": "text", "text": question}]}]], {}),
    ]
    for prompts, extra in forms:
        result = llava_gen.generate(prompts, max_new_tokens=NEW, temperature=0, skip_prompt=True, **extra)[0]
        assert ids(result) == expected, extra


def test_a_hand_formatted_prompt_and_the_original_positional_api(llava):
    image = make_image(8)
    prompt = "USER: <image>\nWhat's in this image? ASSISTANT:"
    gen = SimpleVLMGenerator(llava, track_emissions=False)
    answers = gen([prompt, prompt], [image, make_image(9)], max_new_tokens=NEW, temperature=0, skip_prompt=True)
    assert gen.tokenizer(answers[0], add_special_tokens=False)  # decoded text, one per prompt
    results = gen.generate([prompt], images=[image], max_new_tokens=NEW, temperature=0, skip_prompt=True)
    assert ids(results[0]) == hf_reference(llava, prompt, [image], NEW)
    assert answers[0] == results[0].text
    from simple_generation.vlm import SimpleVLMGenerator as original_path

    assert original_path is SimpleVLMGenerator


def test_store_keys_follow_the_decoded_pixels(llava_gen, tmp_path):
    picture = make_image(11, (64, 48))
    png, jpeg = tmp_path / "a.png", tmp_path / "a.jpg"
    picture.save(png)
    picture.save(jpeg, quality=80)
    store = tmp_path / "run.sqlite"
    call = dict(max_new_tokens=NEW, temperature=0, skip_prompt=True, store=str(store))
    first = llava_gen.generate(["What is it?"], images=[picture], **call)[0]
    assert not first.cached
    again = llava_gen.generate(["What is it?"], images=[str(png)], **call)[0]  # the same pixels, from a file
    assert again.cached and again.text == first.text
    lossy = llava_gen.generate(["What is it?"], images=[str(jpeg)], **call)[0]  # other pixels: generated
    assert not lossy.cached
    other = llava_gen.generate(["What is it?"], images=[make_image(12, (64, 48))], **call)[0]
    assert not other.cached
    text_only = llava_gen.generate(["What is it?"], **call)[0]
    assert not text_only.cached


def test_identical_image_prompts_are_generated_once_and_never_near_duplicates(llava_gen):
    a, b = make_image(21), make_image(22)
    results = llava_gen.generate(["Describe it."] * 3, images=[a, b, a], max_new_tokens=NEW, temperature=0,
                                 skip_prompt=True, near_duplicates=0.5)
    assert llava_gen.last_run.deduplicated == 1 and llava_gen.last_run.near_duplicates == 0
    assert ids(results[0]) == ids(results[2])
    assert all(r.duplicate_of is None for r in results)


def test_a_bad_image_is_that_prompts_error(llava, llava_gen, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(png_bytes(make_image(3))[:60])
    good = make_image(5)
    images = [good, str(tmp_path / "missing.png"), str(corrupt), b"not an image"]
    results = llava_gen.generate(["A", "B", "C", "D"], images=images, max_new_tokens=NEW, temperature=0,
                                 skip_prompt=True, on_error="record")
    assert ids(results[0]) == reference(llava, "A", [good])
    for index, result in enumerate(results[1:], start=1):
        assert result.error is not None and result.error.startswith(f"texts[{index}], image 0"), result.error
    assert "missing.png" in results[1].error
    with pytest.raises(ImageError, match=r"texts\[1\], image 0"):
        llava_gen.generate(["A", "B"], images=images[:2], max_new_tokens=NEW)


def test_remote_images_are_off_unless_allowed(llava_gen):
    result = llava_gen.generate(["A"], images=["http://127.0.0.1:9/cat.png"], max_new_tokens=2, on_error="record")[0]
    assert result.error is not None and "allow_remote_images" in result.error


def test_clear_errors_before_generation(llava, llama_path):
    text_model = SimpleGenerator(llama_path, track_emissions=False)
    with pytest.raises(ValueError, match="text only"):
        text_model.generate(["Hi"], images=[make_image(1)], max_new_tokens=2)
    with pytest.raises(ValueError, match="text only"):
        text_model.generate([[{"role": "user", "content": [{"type": "image", "image": make_image(1)},
                                                           {"type": "text", "text": "Hi"}]}]], max_new_tokens=2)
    with pytest.raises(ValueError, match="image tokens"):
        SimpleGenerator(llava, system_prompt="vicuna_v1.1", track_emissions=False)
    gen = SimpleGenerator(llava, track_emissions=False)
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate(["A", "B"], images=[make_image(1)], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        gen.generate(["A"], images=[make_image(1)], max_new_tokens=2, prompt_logprobs=0)


def test_architectures_the_continuous_engine_cannot_run_fall_back_to_static(vlm_root):
    path = vlm(vlm_root, "qwen2_vl")  # 3-D rope positions from the image grids: model.generate's
    gen = SimpleGenerator(path, engine="continuous", track_emissions=False)
    image = make_image(3)
    result = gen.generate(["What is it?"], images=[image], max_new_tokens=NEW, temperature=0, skip_prompt=True)[0]
    assert gen.last_run.engine == "static" and "qwen2_vl" in gen.last_run.engine_reason
    assert ids(result) == reference(path, "What is it?", [image])


def test_continuous_engine_keeps_image_prompts_out_of_the_prefix_cache(llava, llava_gen):
    """The same expanded tokens with other pixels must never reuse a cached prefix: an image's tokens are one id."""
    long_question = "Look closely at every part of this picture and describe it in detail. " * 3
    a, b = make_image(51), make_image(52)
    first = llava_gen.generate([long_question] * 2, images=[a, b], max_new_tokens=NEW, temperature=0,
                               skip_prompt=True)
    assert llava_gen.last_run.engine == "continuous" and llava_gen.last_run.prefix_cached_tokens == 0
    assert [ids(r) for r in first] == [reference(llava, long_question, [a]), reference(llava, long_question, [b])]
    again = llava_gen.generate([long_question], images=[b], max_new_tokens=NEW, temperature=0, skip_prompt=True)[0]
    assert llava_gen.last_run.prefix_cached_tokens == 0 and ids(again) == ids(first[1])


@pytest.mark.slow
def test_a_model_that_needs_an_image_fails_only_the_prompt_without_one(vlm_root):
    path = vlm(vlm_root, "blip2")
    gen = SimpleGenerator(path, track_emissions=False)
    image = make_image(4)
    results = gen.generate(["Caption:", "No picture"], images=[image, None], max_new_tokens=NEW, temperature=0,
                           skip_prompt=True, on_error="record")
    assert ids(results[0]) == reference(path, "Caption:", [image])
    assert results[1].error is not None and "no image" in results[1].error


def test_logprobs_of_an_image_prompt_equal_hf_scores(llava, llava_gen):
    import torch

    from .vlm_models import load, processor_inputs

    image = make_image(31)
    result = llava_gen.generate(["What is it?"], images=[image], max_new_tokens=4, temperature=0, skip_prompt=True,
                                logprobs=2)[0]
    model, _ = load(llava)
    inputs = processor_inputs(llava, chat_text(llava, "What is it?", 1), [image])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4, output_logits=True,
                             return_dict_in_generate=True)
    expected = [torch.log_softmax(step[0].float(), -1)[token].item()
                for step, token in zip(out.logits, out.sequences[0, inputs["input_ids"].shape[1]:])]
    got = [entry.logprob for entry in result.outputs[0].logprobs]
    assert got == pytest.approx(expected, abs=1e-4)


_LAUNCH_SCRIPT = '''
import json, os, sys
from simple_generation import SimpleGenerator
from tests.vlm_models import make_image

path, out = sys.argv[1], sys.argv[2]
images = [make_image(i, (40 + 8 * i, 48)) for i in range(5)]
prompts = ["What is this?", "Describe it.", "Two pictures.", "No picture here.", "Caption."]
per_prompt = [images[0], images[1], [images[2], images[3]], None, images[4]]
gen = SimpleGenerator(path, track_emissions=False)
results = gen.generate(prompts, images=per_prompt, max_new_tokens=6, temperature=0, skip_prompt=True, batch_size=2)
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
    json.dump([r.outputs[0].token_ids for r in results], handle)
'''


@pytest.mark.slow
def test_accelerate_launch_with_images_returns_every_answer_in_order(llava, tmp_path):
    import json
    import subprocess

    from .test_distributed import ROOT, _env, _free_port, _launch_command

    script = tmp_path / "launch_images.py"
    script.write_text(_LAUNCH_SCRIPT)
    command = _launch_command(2, _free_port(), "--num_machines", "1", str(script), llava, str(tmp_path))
    done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    images = [make_image(i, (40 + 8 * i, 48)) for i in range(5)]
    prompts = ["What is this?", "Describe it.", "Two pictures.", "No picture here.", "Caption."]
    per_prompt = [[images[0]], [images[1]], [images[2], images[3]], [], [images[4]]]
    expected = [reference(llava, p, found) for p, found in zip(prompts, per_prompt)]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def _write_image_job(folder, count: int) -> tuple:
    """A JSONL file of ``count`` records naming images by paths relative to it (one missing), plus an OpenAI-style
    data: URL record."""
    import json

    (folder / "photos").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        make_image(100 + i, (36 + 4 * (i % 5), 40)).save(folder / "photos" / f"{i}.png")
        lines.append({"id": i, "prompt": f"Picture {i}: what is in it?", "image": f"photos/{i}.png"})
    lines.append({"id": "missing", "prompt": "And this one?", "image": "photos/none.png"})
    url = "data:image/png;base64," + base64.b64encode(png_bytes(make_image(7))).decode()
    lines.append({"id": "url", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]}]})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, len(lines)


def _cli(*args, kill_after=None, store=None):
    import os
    import signal
    import subprocess
    import sys
    import time

    from .test_resume import ROOT, _stored

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    main = "import sys; from simple_generation.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", main, "run", *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = process.communicate(timeout=600)
        return process.returncode, err
    deadline = time.monotonic() + 600
    while _stored(store) < kill_after:
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return process.returncode, ""


@pytest.mark.slow
def test_an_image_job_from_a_file_resumes_after_sigkill(llava, tmp_path):
    import json

    from .test_resume import _stored

    job, total = _write_image_job(tmp_path / "job", 24)
    options = ["--batch-size", "2", "--max-new-tokens", "24", "--generation", "min_new_tokens=24"]
    reference_out = tmp_path / "reference.jsonl"
    code, err = _cli(llava, "--input", job, "--output", reference_out, "--no-store", *options)
    assert code == 3, err[-2000:]  # one record failed: its missing image
    reference = [json.loads(line) for line in reference_out.read_text().splitlines()]
    assert len(reference) == total
    missing = next(r for r in reference if r["id"] == "missing")
    assert missing["answer"] is None and missing["error"].startswith("image 0: ") and "none.png" in missing["error"]
    assert all(r["error"] is None and r["answer"] is not None for r in reference if r["id"] != "missing")
    assert next(r for r in reference if r["id"] == 3)["image"] == "photos/3.png"  # carried as written

    out, store = tmp_path / "out.jsonl", tmp_path / "out.jsonl.sqlite"
    code, _ = _cli(llava, "--input", job, "--output", out, *options, kill_after=5, store=store)
    killed_at = _stored(store)
    assert 5 <= killed_at < total - 1
    code, err = _cli(llava, "--input", job, "--output", out, *options)
    assert code == 3, err[-2000:]
    assert [json.loads(line) for line in out.read_text().splitlines()] == reference
    assert f"{killed_at} of {total} prompts already answered" in err
    assert _stored(store) == total - 1
