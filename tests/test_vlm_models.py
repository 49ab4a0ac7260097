"""The tiny vision-language checkpoints of tests/vlm_models.py: they build, load back, and answer from the image."""

import importlib.util
import json
from pathlib import Path

import pytest

from .vlm_models import KINDS, build_vlm, chat_text, hf_reference, load, make_image

PROMPTS = ("Describe the image.", "What color is the sky?", "How many cats are on the sofa?")
IMAGE_TOKENS = {"llava": "<image>", "llava_next": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>",
                "idefics3": "<image>", "smolvlm": "<image>", "paligemma": "<image>", "blip2": "<image>"}


@pytest.fixture(scope="session")
def vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {kind: build_vlm(kind, root / kind) for kind in KINDS}


def _needs_processor(kind):
    """Qwen2-VL, Qwen2.5-VL and SmolVLM processors hold a video processor, which needs torchvision: without it they
    load without one (tests/vlm_models.load); SmolVLM's processor needs num2words (the `vision` extra)."""
    if kind == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("the smolvlm processor needs num2words (pip install -e '.[vision]')")


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_parts_load(kind, vlm_paths):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = vlm_paths[kind]
    assert build_vlm(kind, path) == path  # an existing checkpoint is kept
    model = AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    AutoImageProcessor.from_pretrained(path)
    config = model.config
    image_id = config.image_token_id if getattr(config, "image_token_id", None) is not None else \
        config.image_token_index
    assert image_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[kind])
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert json.loads((Path(path) / "processor_config.json").read_text())["processor_class"].endswith("Processor")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_generates_and_sees_the_image(kind, vlm_paths):
    _needs_processor(kind)
    path = vlm_paths[kind]
    text = chat_text(path, PROMPTS[0], 1)
    _, processor = load(path)
    if kind not in ("paligemma", "blip2"):
        assert text.count(processor.image_token) == 1 and PROMPTS[0] in text
    answer = hf_reference(path, text, [make_image(1, (40, 30))], 6)
    assert len(answer) == 6 and all(isinstance(t, int) for t in answer)
    assert answer == hf_reference(path, text, [make_image(1, (40, 30))], 6)  # greedy: deterministic
    differs = [hf_reference(path, chat_text(path, p, 1), [make_image(1, (48, 40))], 6)
               != hf_reference(path, chat_text(path, p, 1), [make_image(2, (48, 40))], 6) for p in PROMPTS]
    assert any(differs)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("paligemma", "blip2")])
def test_reference_with_no_and_two_images(kind, vlm_paths):
    _needs_processor(kind)
    path = vlm_paths[kind]
    assert len(hf_reference(path, chat_text(path, "Describe the image.", 0), [], 4)) == 4
    two = [make_image(1, (40, 30)), make_image(2, (64, 64))]
    assert len(hf_reference(path, chat_text(path, "Compare the images.", 2), two, 4)) == 4


def test_make_image_is_deterministic():
    a, b = make_image(3, (40, 30)), make_image(3, (40, 30))
    assert a.size == (40, 30) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert make_image(4, (40, 30)).tobytes() != a.tobytes()
    assert make_image(3, (64, 64), mode="L").mode == "L"
