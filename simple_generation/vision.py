"""Images in, text out: the processor side of image-text-to-text models (LLaVA, Qwen2-VL, Idefics3, ...).

A prompt's images come from ``gen(prompts, images=[...])`` or from a conversation's image parts
(``{"type": "image", "image": ...}``, OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``).
:func:`attach_images` moves them out of the prompt (the formatter only sees ``{"type": "image"}`` placeholders,
which the processor's chat template turns into the model's image tokens), and :class:`VisionInputs` turns
(text, images) into what the model takes: the prompt's token ids (image tokens expanded, as the processor does
for one prompt), a digest of each image's decoded pixels (for the store keys) and a loader of the pixel tensors,
called again when the request's batch runs, so a call never holds every image's pixels at once.

Example:
    >>> vision = VisionInputs(processor, config)                               # doctest: +SKIP
    >>> prompt = vision.process(text, [Image.open("cat.png")], "texts[0]")    # doctest: +SKIP
    >>> prompt.token_ids, prompt.digests, prompt.media.tensors()                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ImageError
from .images import IMAGE_PART_TYPES

logger = logging.getLogger("simple_generation")


# Architectures whose processor output was checked to batch row by row (tests/test_vision.py: batched greedy
# answers equal unbatched HF ones). Others run their image prompts one at a time (exact, logged).
BATCHED_MODEL_TYPES = frozenset({"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma",
                                 "blip-2"})
# Architectures the continuous engine runs with images (a prompt's pixels go into its prefill, positions are the
# text's): checked equal to unbatched HF in tests/test_vision.py. Qwen2-VL (3-D rope positions from the image
# grids), PaliGemma (a prefix-LM mask from token types) and BLIP-2 (query tokens) stay on the static engine.
CONTINUOUS_IMAGE_TYPES = frozenset({"llava", "llava_next", "idefics3", "smolvlm"})
# Processors whose pixel tensors are per prompt (dim 0 = prompts, dim 1 = that prompt's images): a batch pads the
# image dimension with all-zero images, which these models drop (as their own processors pad a batch).
PER_PROMPT_PIXELS = frozenset({"idefics2", "idefics3", "smolvlm"})
# Models that cannot generate from a prompt without an image.
NEEDS_AN_IMAGE = frozenset({"blip-2", "paligemma", "instructblip"})


def is_vision_config(config: Any) -> bool:
    """Whether a config is an image-text-to-text model's (``AutoModelForImageTextToText``, with a vision tower)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and getattr(config, "vision_config", None) is not None)


def _image_source(part: dict[str, Any], where: str) -> Any:
    if part.get("type") == "image_url" or "image_url" in part:
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ImageError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}, got {part!r}.")
        return url
    for key in ("image", "url", "path", "image_url"):
        if part.get(key) is not None:
            return part[key]
    raise ImageError(f"{where}: an image part holds no image (give it 'image': a PIL image, a path, bytes or a data: "
                     f"URL), got {part!r}.")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def attach_images(inputs: Sequence[Any], images: Sequence[Any] | None, *, chat: bool, image_token: str | None
                  ) -> tuple[list[Any], list[list[Any]]]:
    """Each input with its images taken out (image parts become ``{"type": "image"}``), and its image sources.

    ``images[i]`` (None, one source, or a list) belongs to prompt ``i``. A string prompt with images becomes a user
    message with the images before the text when the model formats conversations (``chat``), unless it already
    holds the image token (a hand-formatted prompt, e.g. ``"USER: <image>\\nWhat is this? ASSISTANT:"``); a
    conversation gets them at the start of its last user message.
    """
    if images is not None:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError("images must be a list with one entry per prompt (None, an image, or a list of images).")
        if len(images) != len(inputs):
            raise ValueError(f"images has {len(images)} entries for {len(inputs)} prompts: give one per prompt "
                             "(None for a prompt without an image).")
    items: list[Any] = []
    sources: list[list[Any]] = []
    for index, item in enumerate(inputs):
        extra = [] if images is None or images[index] is None else \
            list(images[index]) if isinstance(images[index], (list, tuple)) else [images[index]]
        where = f"texts[{index}]"
        if isinstance(item, str):
            if extra and chat and not (image_token and image_token in item):
                parts = [*({"type": "image"} for _ in extra), {"type": "text", "text": item}]
                item = [{"role": "user", "content": parts}]
            items.append(item)
            sources.append(extra)
            continue
        found: list[Any] = []
        messages = []
        for position, message in enumerate(item):
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if is_image_part(part):
                        found.append(_image_source(part, f"{where}[{position}]"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                message = {**message, "content": parts}
            messages.append(message)
        if extra:
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last is None:
                raise ValueError(f"{where}: images were given for a conversation without a user message.")
            content = messages[last]["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            messages[last] = {**messages[last], "content": [*({"type": "image"} for _ in extra), *parts]}
            # images= come before the last user message's own image parts, in the order of the parts
            before = sum(1 for m in messages[:last] for p in (m["content"] if isinstance(m["content"], list) else [])
                         if isinstance(p, dict) and p.get("type") == "image")
            found[before:before] = extra
        items.append(messages)
        sources.append(found)
    return items, sources


@dataclass
class PromptMedia:
    """What an engine loads for one prompt's images when its batch runs (nothing is held until then).

    ``tensors()``: the processor's tensors for the prompt besides its tokens (pixels, image sizes or grids, token
    types), for HF models; ``images()``: the decoded images, for engines that process images themselves (vLLM).
    Both check that the pixels are still those the prompt's key was made from.
    """

    count: int
    tensors: Callable[[], dict[str, Any]]
    images: Callable[[], list[Any]]
    # the prompt's tokens before the processor expands its image placeholders (engines that expand them: vLLM)
    placeholder_ids: list[int] | None = None


@dataclass
class ProcessedPrompt:
    """One prompt with its images, as the model takes it (see the module docstring)."""

    token_ids: list[int]
    digests: list[str]
    media: PromptMedia


class VisionInputs:
    """The processor side of one image-text-to-text generator (see the module docstring)."""

    def __init__(self, processor: Any, config: Any, *, allow_remote: bool = False):
        self.processor = processor
        self.model_type = getattr(config, "model_type", "")
        self.allow_remote = allow_remote
        tokenizer = getattr(processor, "tokenizer", None)
        self.image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
        self.batched = self.model_type in BATCHED_MODEL_TYPES
        self.needs_an_image = self.model_type in NEEDS_AN_IMAGE

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The processor's chat template over messages whose content may be part lists."""
        parts_messages = [m if isinstance(m["content"], list) else
                          {**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        try:
            return self.processor.apply_chat_template(parts_messages, **kwargs)
        except AttributeError as err:  # loaded without its video processor (no torchvision): the generic renderer
            if "video_processor" not in str(err):
                raise
            from transformers.processing_utils import ProcessorMixin

            return ProcessorMixin.apply_chat_template(self.processor, parts_messages, **kwargs)

    def _load(self, sources: Sequence[Any], where: str) -> list[Any]:
        from .images import load_image

        return [load_image(source, allow_remote=self.allow_remote, where=f"{where}, image {i}")
                for i, source in enumerate(sources)]

    def _run(self, text: str, images: list[Any]) -> dict[str, Any]:
        tokenizer = getattr(self.processor, "tokenizer", None)
        bos = getattr(tokenizer, "bos_token", None)
        options: dict[str, Any] = {"return_tensors": "pt"}
        if bos and text.startswith(bos):  # the template wrote BOS already: no second one (as for text prompts)
            options["add_special_tokens"] = False
        nested = [images] if self.model_type in PER_PROMPT_PIXELS else images
        with _quiet_transformers():  # processors warn per call (PaliGemma: "inferring image tokens")
            return dict(self.processor(text=[text], images=nested if images else None, **options))

    def _placeholder_ids(self, text: str) -> list[int]:
        """``text``'s tokens as the processor's tokenizer makes them, before any image placeholder is expanded."""
        tokenizer = self.processor.tokenizer
        bos = getattr(tokenizer, "bos_token", None)
        return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def process(self, text: str, sources: Sequence[Any], where: str) -> ProcessedPrompt:
        """Decode ``sources``, run the processor on (text, images) for this one prompt; ImageError/ValueError
        naming ``where`` when an image is missing or bad, or the processor refuses the pair."""
        images = self._load(sources, where)
        from .images import pixel_digest

        digests = [pixel_digest(image) for image in images]
        outputs = self._checked_run(text, images, where)
        token_ids = outputs["input_ids"][0].tolist()
        del outputs, images

        def images_again() -> list[Any]:
            again = self._load(sources, where)
            if [pixel_digest(image) for image in again] != digests:
                raise ImageError(f"{where}: an image changed on disk while the call ran; run it again.")
            return again

        def tensors() -> dict[str, Any]:
            extras = self._checked_run(text, images_again(), where)
            if extras["input_ids"][0].tolist() != token_ids:
                raise ImageError(f"{where}: the processor gave other tokens for the same prompt and images.")
            return {k: v for k, v in extras.items() if k not in ("input_ids", "attention_mask")}

        return ProcessedPrompt(token_ids, digests, PromptMedia(len(digests), tensors, images_again,
                                                               self._placeholder_ids(text)))

    def _checked_run(self, text: str, images: list[Any], where: str) -> dict[str, Any]:
        try:
            return self._run(text, images)
        except (ValueError, TypeError, IndexError, RuntimeError) as err:
            hint = ""
            if images and self.image_token and self.image_token not in text and self.chat_template is None:
                hint = f" (the prompt holds no {self.image_token!r} placeholder for its images)"
            raise ImageError(f"{where}: the processor refused this prompt with {len(images)} image(s){hint}: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def model_inputs(rows: Sequence[dict[str, Any] | None], lengths: Sequence[int], width: int, model: Any,
                 device: Any) -> dict[str, Any]:
    """:func:`collate` the rows' tensors for ``model`` and move them to ``device``, floating ones (pixels) in the
    model's dtype."""
    import torch

    batch = collate(rows, lengths, width, model.config.model_type)
    return {k: (v.to(device, dtype=model.dtype) if v.is_floating_point() else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate(rows: Sequence[dict[str, Any] | None], lengths: Sequence[int], width: int, model_type: str
            ) -> dict[str, Any]:
    """Batch the rows' processor tensors (``rows[i]`` None: a row without images) for a left-padded batch of
    ``width`` tokens, row ``i`` holding ``lengths[i]`` of them.

    Tensors aligned with the tokens (``[1, length, ...]``: token types) are left-padded with zeros like the
    tokens. Per-prompt pixel tensors (Idefics3: ``[1, images, ...]``) are stacked, padded with all-zero images.
    Per-image tensors (``[images or patches, ...]``: LLaVA's pixels, Qwen2-VL's patches and grids, LLaVA-NeXT's
    patches and sizes) are concatenated in row order, trailing dimensions zero-padded to the largest (the model
    cuts each image's real patches by its size, as with its own processor's batches).
    """
    import torch

    keys: list[str] = []
    for row in rows:
        for key in row or {}:
            if key not in keys:
                keys.append(key)
    batch: dict[str, Any] = {}
    for key in keys:
        values = [None if row is None else row.get(key) for row in rows]
        present = [v for v in values if v is not None]
        if not all(isinstance(v, torch.Tensor) for v in present):
            batch[key] = present[0] if len(present) == 1 else present  # not a tensor: leave it to the model
            continue
        aligned = all(v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == lengths[i]
                      for i, v in enumerate(values) if v is not None) and any(
            v.shape[1] > 1 for v in present)
        if aligned:
            template = present[0]
            out = torch.zeros((len(rows), width, *template.shape[2:]), dtype=template.dtype)
            for i, v in enumerate(values):
                if v is not None:
                    out[i, width - lengths[i]:] = v[0]
            batch[key] = out
        elif model_type in PER_PROMPT_PIXELS:
            shape = [max(v.shape[d] for v in present) for d in range(1, present[0].dim())]
            out = torch.zeros((len(rows), *shape), dtype=present[0].dtype)
            for i, v in enumerate(values):
                if v is not None:
                    out[(i, *(slice(0, s) for s in v.shape[1:]))] = v[0]
            batch[key] = out
        else:
            shape = [max(v.shape[d] for v in present) for d in range(1, present[0].dim())]
            padded = []
            for v in present:
                if list(v.shape[1:]) != shape:
                    grown = torch.zeros((v.shape[0], *shape), dtype=v.dtype)
                    grown[(slice(None), *(slice(0, s) for s in v.shape[1:]))] = v
                    v = grown
                padded.append(v)
            batch[key] = torch.cat(padded, dim=0)
    return batch

