"""Tiny random vision-language checkpoints built offline, with the real model, processor and image-processor classes.

``build_vlm(kind, path)`` writes a folder that loads back with ``AutoProcessor.from_pretrained(path)`` and
``AutoModelForImageTextToText.from_pretrained(path)``, like a hub checkpoint. Tokenizers are byte-level BPEs trained
locally (``PreTrainedTokenizerFast``) with the model's image special tokens added; config token ids match them.
Qwen2-VL, Qwen2.5-VL and SmolVLM processors hold a video processor, which transformers 5.24 builds only with
torchvision (SmolVLM's also imports num2words): their folders are written without it and their processors load
only where torchvision is installed (``NEEDS_TORCHVISION``; models, tokenizers and image processors load anywhere).

PROCESSOR LAYOUTS: one prompt processed alone, ``processor(text=..., images=..., return_tensors="pt")``,
n = its images. input_ids / attention_mask are [1, L] int64 for every kind; float tensors are float32.

kind        | other keys (shapes, dtype)                         | dim 0 of image tensors    | <image> tokens per image
llava       | pixel_values [n, 3, 32, 32]                        | per image                 | 16, any size
llava_next  | pixel_values [n, P, 3, 32, 32] (P = 1 + tiles:     | per image                 | by size: 40x30 10,
            |   3 or 5, zero-padded to the call's max);          |                           | 64x64 24, 48x40 24,
            |   image_sizes [n, 2] int64 (original H, W)         |                           | 100x60 14, 20x80 16
qwen2_vl,   | pixel_values [sum of patches, 294] (all images'    | patches, concatenated     | patches / 4: 40x30 6,
qwen2_5_vl  |   7x7x2 patches concatenated); image_grid_thw      | over the call's images;   | 64x64 25, 48x40 9,
            |   [n, 3] int64; mm_token_type_ids [1, L] int64     | image_grid_thw per image  | 100x60 28, 20x80 6
idefics3,   | pixel_values [1, T, 3, 32, 32]; pixel_attention_   | PER PROMPT: T = tiles of  | 4 a tile x (rows x cols
smolvlm     |   mask [1, T, 32, 32] int64 (T = the prompt's      | all its images (rows x    | + 1 global): 40x30 20,
            |   tiles, zero-padded to the call's max)            | cols + 1 each)            | 64x64 20, 20x80 12
paligemma   | token_type_ids [1, L] int64 (prefix-LM mask: keep  | per image                 | 16, any size
            |   it); labels [1, L] (training only); pixel_values |                           |
            |   [n, 3, 32, 32]                                   |                           |
blip2       | pixel_values [n, 3, 32, 32]                        | per image                 | 8 (query tokens), once
                                                                                                        a prompt
(<image> only: idefics3/smolvlm also write <fake_token_around_image>, <row_i_col_j> or <global-img> before each
tile and "\n" after each row of tiles; qwen wraps each image in <|vision_start|> ... <|vision_end|>.)
0 images: accepted by all but paligemma (the processor raises) and blip2 (the processor accepts, but
``generate`` requires pixel_values); no pixel keys then (qwen keeps mm_token_type_ids, all zeros).
2 images: accepted by all; blip2 still inserts 8 tokens and the model silently uses the first image only.
Inserts image tokens itself when the text has none: paligemma (prepends ``<image>`` x n + ``<bos>``, appends "\n";
with placeholders it inserts ``<bos>`` after the last one) and blip2 (prepends 8 ``<image>`` whenever images are
given: the text must hold no placeholder). All the others need one placeholder per image in the text (the chat
template writes it; ``<|vision_start|><|image_pad|><|vision_end|>`` for qwen) and expand it; a count mismatch
raises ValueError. Images for one prompt: a flat list for llava/llava_next/qwen/blip2, a nested ``[[...]]`` for
idefics3/smolvlm/paligemma (``processor_inputs`` does it).
Batched HF (a list of prompts, ``padding=True, padding_side="left"``, flat or per-prompt nested images) gives the
same greedy tokens as each prompt alone, for every kind, with 1+1 images of different sizes, 0+2 and 1+2 images.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

KINDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "blip2")

# Kinds whose processor holds a video processor: transformers builds those only with torchvision installed
# (and SmolVLM's processor also imports num2words).
NEEDS_TORCHVISION = ("qwen2_vl", "qwen2_5_vl", "smolvlm")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Describe the image. What is in this picture? What color is the sky? How many cats are on the sofa?
Tell me what is two plus two? Two plus two is four. Answer briefly, please. Caption this photo.
A red car parked next to a green tree under a blue sky, with white clouds and a yellow sun.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / @ # % & *
User: Assistant: USER: ASSISTANT: [INST] [/INST] system user assistant
""".splitlines()

TEXT_INIT = 0.3  # the text model's initializer_range: large, so that greedy answers depend on image and prompt

# --- chat templates, in the spirit of the real checkpoints' (images first / in place, then text) -----------------

_PARTS = (  # content parts in their order ({IMAGE} for an image), or a plain string content
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{IMAGE}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
_IMAGES_THEN_TEXT = (  # llava-hf: all the images first, one "<image>\n" each, then the texts
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
)

CHAT_TEMPLATES = {
    # llava-1.5: "USER: <image>\nWhat is this? ASSISTANT:"
    "llava": (
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
        + _IMAGES_THEN_TEXT + "{{ ' ' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # llava-v1.6-mistral: "[INST] <image>\nWhat is this? [/INST]"
    "llava_next": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}" + _IMAGES_THEN_TEXT + "{{ ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}" + _IMAGES_THEN_TEXT + "{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Qwen2-VL: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    "qwen2_vl": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        + _PARTS.replace("{IMAGE}", "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}")
        + "{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # Idefics3 / SmolVLM: "<|begin_of_text|>User:<image>What?<end_of_utterance>\nAssistant:"
    "idefics3": (
        "{{ bos_token }}{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}{{ ':' }}"
        + _PARTS.replace("{IMAGE}", "{{ '<image>' }}")
        + "{{ '<end_of_utterance>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    ),
}
CHAT_TEMPLATES["qwen2_5_vl"] = CHAT_TEMPLATES["qwen2_vl"]
CHAT_TEMPLATES["smolvlm"] = CHAT_TEMPLATES["idefics3"]


# --- tokenizers ---------------------------------------------------------------------------------------------------

def _tokenizer(specials: dict, extra: list[str], *, add_bos: bool = False, vocab_size: int = 400):
    """A byte-level BPE trained on ``CORPUS``; ``specials`` are bos/eos/unk/pad, ``extra`` added special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    names = list(dict.fromkeys(v for v in specials.values() if v))
    tokenizer = Tokenizer(models.BPE(unk_token=specials.get("unk_token")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    if add_bos:
        bos = specials["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in specials.items() if v},
                                   extra_special_tokens=extra)


_LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _llama_text(tokenizer, hidden: int = 64, **extra) -> dict:
    return {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": hidden * 2,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "initializer_range": TEXT_INIT, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **extra}


def _tiny_vision(model_type: str, image_size: int, patch_size: int, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size, "initializer_range": 0.2,
            **extra}


# --- builders, one per kind: (model, processor) -------------------------------------------------------------------

def _llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer(_LLAMA_SPECIALS, ["<image>"], add_bos=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = LlavaConfig(
        vision_config=_tiny_vision("clip_vision_model", 32, 8, projection_dim=32),
        text_config=_llama_text(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaProcessor(image_processor, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATES["llava"])
    return LlavaForConditionalGeneration(config), processor


def _llava_next():
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = _tokenizer(_LLAMA_SPECIALS, ["<image>"], add_bos=True)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    config = LlavaNextConfig(
        vision_config=_tiny_vision("clip_vision_model", 32, 16, projection_dim=32),
        text_config=_llama_text(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        image_seq_length=4, pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaNextProcessor(image_processor, tokenizer, patch_size=16, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATES["llava_next"])
    return LlavaNextForConditionalGeneration(config), processor


_QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_parts(kind: str):
    """Model, tokenizer, image processor of a Qwen2-VL / Qwen2.5-VL (the processor needs a video processor)."""
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
                           _QWEN_TOKENS)
    # 7 px patches merged 2x2: one token per 14x14 pixels (sides rounded to 14), between 4 and 64 tokens an image
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 14 * 14, max_pixels=64 * 14 * 14, patch_size=7)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "initializer_range": TEXT_INIT, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 7,
                  "initializer_range": 0.2}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        return Qwen2VLForConditionalGeneration(config), tokenizer, image_processor
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
              "patch_size": 7, "window_size": 28, "fullatt_block_indexes": [1], "initializer_range": 0.2}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config), tokenizer, image_processor


_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def _idefics_parts(kind: str):
    """Model, tokenizer, image processor of an Idefics3 / SmolVLM: 32 px tiles of 4x4 patches, pixel-shuffled 2x2
    into 4 tokens a tile; images up to 64 px split into at most 2x2 tiles plus the global image."""
    tokenizer = _tokenizer({"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>",
                            "unk_token": "<unk>", "pad_token": "<pad>"}, _IDEFICS_TOKENS)
    sizes = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "initializer_range": 0.2}
    common = {"text_config": _llama_text(tokenizer), "scale_factor": 2,
              "image_token_id": tokenizer.convert_tokens_to_ids("<image>"), "pad_token_id": tokenizer.pad_token_id}
    if kind == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil

        config = Idefics3Config(vision_config=vision, **common)
        return Idefics3ForConditionalGeneration(config), tokenizer, Idefics3ImageProcessorPil(**sizes)
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    config = SmolVLMConfig(vision_config=vision, **common)
    return SmolVLMForConditionalGeneration(config), tokenizer, SmolVLMImageProcessorPil(**sizes)


def _idefics3():
    from transformers import Idefics3Processor

    model, tokenizer, image_processor = _idefics_parts("idefics3")
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATES["idefics3"])
    return model, processor


def _paligemma():
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = _tokenizer({"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
                           ["<image>"])
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds <locXXXX>/<segXXX> tokens: vocab ~1400
    text = {"model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "initializer_range": TEXT_INIT, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = PaliGemmaConfig(
        vision_config=_tiny_vision("siglip_vision_model", 32, 8, projection_dim=64), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer),
        projection_dim=64, hidden_size=64, pad_token_id=tokenizer.pad_token_id,
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = _tokenizer({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
                           ["<image>"], add_bos=True)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=8)
    text = {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 64, "ffn_dim": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64,
            "max_position_embeddings": 512, "init_std": TEXT_INIT, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "initializer_range": 0.2},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "encoder_hidden_size": 32, "vocab_size": 64, "initializer_range": 0.2},
        text_config=text, num_query_tokens=8, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=0.2,
    )
    return Blip2ForConditionalGeneration(config), processor


def _save_processor_files(kind: str, image_processor, tokenizer, path: Path) -> None:
    """Write what ``processor.save_pretrained`` writes, for the processors that hold a video processor (Qwen2-VL,
    Qwen2.5-VL, SmolVLM): transformers builds a video processor only with torchvision installed, so these files are
    written by hand and ``AutoProcessor.from_pretrained`` loads them where torchvision is (and num2words for SmolVLM).
    """
    classes = {"qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
               "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
               "smolvlm": ("SmolVLMProcessor", "SmolVLMVideoProcessor")}
    processor_class, video_class = classes[kind]
    if kind == "smolvlm":
        video = {"video_processor_type": video_class, "size": {"longest_edge": 64},
                 "max_image_size": {"longest_edge": 32}}
        extra = {"image_seq_len": 4}
    else:
        video = {"video_processor_type": video_class, "size": dict(image_processor.size), "patch_size": 7,
                 "temporal_patch_size": 2, "merge_size": 2}
        extra = {}
    tokenizer.init_kwargs["processor_class"] = processor_class
    tokenizer.save_pretrained(path)
    config = {"image_processor": image_processor.to_dict(), "video_processor": video, **extra,
              "processor_class": processor_class}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATES[kind])


_BUILDERS = {"llava": _llava, "llava_next": _llava_next, "idefics3": _idefics3, "paligemma": _paligemma,
             "blip2": _blip2}


def holds_vlm(path: str | Path) -> bool:
    path = Path(path)
    return ((path / "config.json").is_file() and any(path.glob("*.safetensors"))
            and (path / "tokenizer_config.json").is_file() and (path / "processor_config.json").is_file())


def build_vlm(kind: str, path: str | Path) -> str:
    """Write a tiny random ``kind`` checkpoint (model, processor, tokenizer, image processor) to ``path``; return it.

    A folder that already holds one is returned as it is. Deterministic: the same files each time (the weights'
    seed is the kind's index in ``KINDS``). Written beside ``path`` then renamed, so a killed build leaves no
    half-written checkpoint there.
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if holds_vlm(path):
        return str(path)
    torch.manual_seed(KINDS.index(kind))
    processor = None
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        model, tokenizer, image_processor = _qwen_parts(kind)
    elif kind == "smolvlm":
        model, tokenizer, image_processor = _idefics_parts(kind)
    else:
        model, processor = _BUILDERS[kind]()
        tokenizer = processor.tokenizer
    model = model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_length = None

    def save(folder: Path) -> None:
        if processor is None:
            _save_processor_files(kind, image_processor, tokenizer, folder)
        else:
            processor.save_pretrained(folder)
        model.save_pretrained(folder)

    save_atomically(path, save)
    return str(path)


def save_atomically(path: Path, save) -> None:
    """``save(folder)`` into a staging folder beside ``path``, then renamed to ``path`` (a run killed while saving
    leaves no half-written checkpoint where a later run would take it as built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        save(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- inputs and the unbatched reference -----------------------------------------------------------------------------

def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB"):
    """A deterministic picture of ``size`` (W, H): a colour gradient whose direction and colours depend on ``seed``,
    plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / max(width, 1) + np.sin(angle) * y / max(height, 1) + 1) / 2
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = low + (high - low) * ramp[..., None] + rng.normal(0, 24, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


_LOADED: dict[str, tuple] = {}


def load(path: str):
    """``(model, processor)`` of ``path``, loaded once (fp32, eval)."""
    path = str(path)
    if path not in _LOADED:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path)
        except ImportError:  # a video processor needs torchvision: the same processor class without it
            from simple_generation.loading import _images_only, _processor_class

            processor = _images_only(_processor_class(path)).from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        _LOADED[path] = (model, processor)
    return _LOADED[path]


def kind_of(path: str) -> str:
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    return {"blip-2": "blip2"}.get(model_type, model_type)


def processor_inputs(path: str, text: str, images: list):
    """The processor's tensors for one prompt with ``images`` (nested as that processor wants for one prompt)."""
    _, processor = load(path)
    kind = kind_of(path)
    if not images:
        return processor(text=text, return_tensors="pt")
    nested = [images] if kind in ("idefics3", "smolvlm", "paligemma") else images
    return processor(text=text, images=nested, return_tensors="pt")


def hf_reference(path: str, text: str, images: list, max_new_tokens: int) -> list[int]:
    """The unbatched HF answer: greedy ``model.generate`` on the processor's output, new token ids only."""
    import torch

    model, _ = load(path)
    inputs = processor_inputs(path, text, images)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def chat_text(path: str, user_text: str, n_images: int) -> str:
    """The prompt of one user turn with ``n_images`` images then ``user_text`` (chat families), or the user text
    alone (paligemma, blip2: their processors put the image tokens in)."""
    _, processor = load(path)
    if kind_of(path) in ("paligemma", "blip2"):
        return user_text
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": user_text}]
    render = processor.apply_chat_template
    if not hasattr(processor, "video_processor"):  # loaded without one (no torchvision): SmolVLM's own renderer
        from transformers.processing_utils import ProcessorMixin  # reads it, the generic one does not

        render = functools.partial(ProcessorMixin.apply_chat_template, processor)
    return render([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
