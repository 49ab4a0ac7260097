"""Turn user prompts or conversations into the exact text the model is fed.

Three ways, one active per generator:

- a named FastChat-compatible template (``system_prompt="vicuna_v1.1"``), see :mod:`.templates`;
- the tokenizer's own chat template (``apply_chat_template=True``);
- neither: plain strings go through unchanged, and conversations (lists of ``{"role", "content"}``
  messages) become the plain ``User:``/``Assistant:`` transcript, as in ``conversation_from_user_prompts``.

A message's content is text: special-token text in it (``</s>``, ``<|im_end|>``) is tokenized as the characters
it is, never as the control token; special tokens come only from the template. A plain string prompt is
tokenized as transformers does (special-token text in it is the token: a hand-formatted prompt means it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from .images import IMAGE_PART_TYPES
from .templates import get_template, render_conversation

logger = logging.getLogger("simple_generation")

Message = dict[str, str]
_ROLES = ("system", "user", "assistant")
_MARK = re.compile("\ue000(\\d+)\ue001")  # stands for message i's content while locating contents


class ChatText(str):
    """A formatted chat prompt that knows which of its characters are message content holding special-token
    text (``content_spans``, ``(start, end)`` pairs): :meth:`PromptFormatter.tokenize` encodes those as plain
    text. Everything else about it is the ``str`` it is."""

    content_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, content_spans: Sequence[tuple[int, int]]):
        obj = super().__new__(cls, text)
        obj.content_spans = tuple(content_spans)
        return obj


def validate_inputs(texts: Any) -> list[str | list[Message]]:
    """A prompt, a list of prompts, or a list of conversations; raise naming the first bad element."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts is bytes: decode it to a str first (e.g. texts.decode('utf-8')), or pass a list "
                        "of strings.")
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
    for index, item in enumerate(texts):
        if isinstance(item, str):
            continue
        if isinstance(item, (bytes, bytearray)):
            raise TypeError(f"texts[{index}] is bytes, not a string: decode it first (e.g. .decode('utf-8')).")
        if isinstance(item, Sequence):
            _validate_messages(item, f"texts[{index}]")
            continue
        raise TypeError(
            f"texts[{index}] is a {type(item).__name__}, not a string; every prompt must be a str "
            "(or a conversation: a list of {'role': ..., 'content': ...} messages)."
        )
    return list(texts)


def plain_transcript(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """A conversation as ``Role: content`` lines, for models with neither a named nor a chat template;
    ending with ``Assistant:`` when the last turn is the user's (and ``add_generation_prompt``)."""
    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    if add_generation_prompt and messages and messages[-1]["role"] == "user":
        text += "\nAssistant:"
    return text


def _validate_messages(messages: Sequence[Any], where: str) -> None:
    if not messages:
        raise ValueError(f"{where} is an empty conversation.")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES \
                or not (isinstance(message.get("content"), str) or _is_part_list(message.get("content"))):
            raise TypeError(
                f"{where}[{position}] must be a dict with 'role' in {_ROLES} and a str 'content' (or a list of "
                f"content parts: {{'type': 'text', 'text': ...}}, {{'type': 'image', 'image': ...}}), got {message!r}."
            )


def _is_part_list(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(part, dict) and (part.get("type") in IMAGE_PART_TYPES
                                    or (part.get("type") == "text" and isinstance(part.get("text"), str)))
        for part in content)


def content_text(content: str | list[dict[str, Any]]) -> str:
    """A message's text: its text parts joined (image parts hold none)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def has_image_parts(item: Any) -> bool:
    """Whether a conversation holds image parts (placeholders or images)."""
    return not isinstance(item, str) and any(
        isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"]) for m in item)


def text_only(item: Any) -> Any:
    """A conversation whose part-list contents are joined into strings (for text-only formatting)."""
    if isinstance(item, str) or not any(isinstance(m.get("content"), list) for m in item):
        return item
    return [{**m, "content": content_text(m["content"])} for m in item]


class PromptFormatter:
    """Formats prompts for one generator; see the module docstring.

    Example:
        >>> formatter = PromptFormatter(tokenizer, template="vicuna_v1.1")        # doctest: +SKIP
        >>> formatter.format(["Hi"])                                              # doctest: +SKIP
        ["A chat between a curious user and ... USER: Hi ASSISTANT:"]
    """

    def __init__(
        self,
        tokenizer,
        template: str | Any | None = None,
        system_message: str | None = None,
        apply_chat_template: bool = False,
        add_generation_prompt: bool = True,
        vision: Any = None,
    ):
        self.vision = vision  # image-text models: the processor's chat template places image tokens
        if template is not None and apply_chat_template:
            raise ValueError("Pass either system_prompt=<template name> or apply_chat_template=True, not both.")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.system_message = system_message
        self.apply_chat_template = apply_chat_template
        self.add_generation_prompt = add_generation_prompt
        if apply_chat_template and not self._chat_template:
            raise ValueError(
                "apply_chat_template=True, but this tokenizer has no chat template. Pick a named template "
                "(system_prompt=..., see available_system_prompts()) or set tokenizer.chat_template."
            )
        if system_message is not None and self.template is None and not apply_chat_template:
            raise ValueError("system_message needs a template: pass system_prompt=<name> or apply_chat_template=True.")

    @property
    def _chat_template(self) -> str | None:
        vision_template = self.vision.chat_template if self.vision is not None else None
        return vision_template or getattr(self.tokenizer, "chat_template", None)

    @property
    def formats_conversations(self) -> bool:
        """Whether message lists can be formatted: a named template, or a tokenizer (processor) with a chat
        template."""
        return self.template is not None or bool(self._chat_template)

    @property
    def stop_strings(self) -> list[str]:
        return self.template.stop_strings if self.template is not None else []

    @property
    def stop_token_ids(self) -> list[int]:
        return self.template.stop_token_ids if self.template is not None else []

    def messages_for(self, item: str | list[Message]) -> list[Message]:
        return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)

    def format_one(self, item: str | list[Message]) -> str:
        """The prompt text of one input; a conversation whose contents hold special-token text comes back as a
        :class:`ChatText` that marks them (tokenized as text)."""
        if has_image_parts(item):
            if self.vision is None:
                raise ValueError("this model takes text only, and the conversation holds images: load an "
                                 "image-text-to-text model (e.g. LLaVA, Qwen2-VL, SmolVLM) for image prompts.")
            if self.template is not None:
                raise ValueError("a named template does not know where this model's image tokens go: drop "
                                 "system_prompt= for image prompts (the processor's chat template places them).")
        elif not isinstance(item, str):
            item = text_only(item)
        text = self._render(item)
        if isinstance(item, str) or has_image_parts(item) or not any(self.has_special_text(m["content"])
                                                                     for m in item):
            return text
        return ChatText(text, self._content_spans(item, text))

    @property
    def special_texts(self) -> list[str]:
        """The texts of the tokenizer's special tokens, longest first."""
        if not hasattr(self, "_special_texts"):
            decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
            texts = {t.content for t in decoder.values() if getattr(t, "special", False)}
            texts |= set(getattr(self.tokenizer, "all_special_tokens", None) or [])
            self._special_texts = sorted((t for t in texts if t), key=len, reverse=True)
        return self._special_texts

    def has_special_text(self, content: str) -> bool:
        """Whether ``content`` holds the text of a special token (which must then be tokenized as text)."""
        return any(t in content for t in self.special_texts)

    def _content_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Where the contents holding special-token text are in ``text``: the conversation is rendered again with
        a mark for each content, and the marks' places are where the contents went."""
        skeleton = self._render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
        parts = _MARK.split(skeleton)  # template piece, content index, template piece, ...
        for clean in (lambda c: c, str.strip):
            spans, rebuilt, at = [], [], 0
            for i, part in enumerate(parts):
                piece = clean(messages[int(part)]["content"]) if i % 2 else part
                if i % 2 and self.has_special_text(piece):
                    spans.append((at, at + len(piece)))
                rebuilt.append(piece)
                at += len(piece)
            if "".join(rebuilt) == text:
                return spans
        raise ValueError("a message holds special-token text, and the template changes message contents in a way "
                         "that hides where they are in the prompt: remove the special-token text from the message.")

    def _render(self, item: str | list[Message]) -> str:
        if self.template is not None:
            return render_conversation(self.template, self.messages_for(item), self.system_message)
        if self.apply_chat_template or (not isinstance(item, str) and self.formats_conversations):
            return self._apply_chat_template(self.messages_for(item))
        if not isinstance(item, str):  # no template at all: the transcript conversation_from_user_prompts uses
            if has_image_parts(item):  # a processor that places image tokens itself (PaliGemma, BLIP-2)
                if len(item) == 1 and item[0]["role"] == "user":
                    return content_text(item[0]["content"])
                item = text_only(item)
            return plain_transcript(item, self.add_generation_prompt)
        return item

    def _apply_chat_template(self, messages: list[Message]) -> str:
        if not self.formats_conversations:
            raise ValueError(
                "Conversations need a template: pass system_prompt=<name> (see available_system_prompts()) or "
                "use a tokenizer with a chat template and apply_chat_template=True."
            )
        if self.system_message is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_message}] + messages
        add_generation_prompt = self.add_generation_prompt and messages[-1]["role"] == "user"
        if self.vision is not None and self.vision.chat_template:
            return self.vision.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def format_checked(self, index: int, item: str | list[Message]) -> str:
        """``format_one``, with a template's refusal as a ValueError naming ``texts[index]``."""
        try:
            return self.format_one(item)
        except Exception as err:
            if self.template is not None and isinstance(err, ValueError):
                raise ValueError(f"The template {self.template.name!r} cannot format texts[{index}]: {err}") from err
            if self.template is not None or type(err).__name__ != "TemplateError":
                raise
            # jinja's TemplateError: the chat template itself refused (raise_exception in the template)
            raise ValueError(
                f"The tokenizer's chat template rejected texts[{index}]: {err}. Some templates accept no "
                "system message or need user/assistant turns to alternate; adjust the conversation or "
                "system_message."
            ) from err

    def format(self, inputs: Sequence[str | list[Message]]) -> list[str]:
        return [self.format_checked(index, item) for index, item in enumerate(inputs)]

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids; a prompt whose text already starts with the BOS token gets no second one.

        The marked contents of a :class:`ChatText` are encoded as text (``split_special_tokens=True``): the
        special-token text a user typed stays text. A ``str`` carrying a ``token_ids`` list (a
        :class:`~simple_generation.translation.SourceText`, tokenized with its source language) is fed as those
        ids; its text is what the store keys name. Any other prompt is encoded as transformers encodes it.
        """
        bos = self.tokenizer.bos_token
        carries_bos = [bool(bos) and p.startswith(bos) for p in prompts]
        chat = [bool(getattr(p, "content_spans", ())) for p in prompts]
        ids: list[list[int] | None] = [None] * len(prompts)
        for i, prompt in enumerate(prompts):  # a prompt tokenized by its maker (translation's source languages)
            if isinstance(getattr(prompt, "token_ids", None), list):
                ids[i] = list(prompt.token_ids)
        for flag in (False, True):
            group = [i for i, c in enumerate(carries_bos) if c == flag and not chat[i] and ids[i] is None]
            if group:
                encoded = self.tokenizer([prompts[i] for i in group], add_special_tokens=not flag)["input_ids"]
                for i, row in zip(group, encoded):
                    ids[i] = row
        for i, prompt in enumerate(prompts):
            if chat[i]:
                ids[i] = self._tokenize_chat(prompt, add_special_tokens=not carries_bos[i])
        return ids  # type: ignore[return-value]

    def _tokenize_chat(self, text: ChatText, add_special_tokens: bool) -> list[int]:
        """The template's pieces encoded as usual, the marked contents as text, one after the other."""
        pieces, at = [], 0
        for start, end in text.content_spans:
            pieces += [(text[at:start], False), (text[start:end], True)]
            at = end
        pieces.append((text[at:], False))
        ids: list[int] = []
        for piece, as_text in pieces:
            if not piece:
                continue
            if not ids:  # the first piece: as the whole prompt would start (BOS included)
                ids += self.tokenizer(piece, add_special_tokens=add_special_tokens,
                                      split_special_tokens=as_text)["input_ids"]
            else:
                ids += self._continue(piece, as_text)
        return ids

    def _continue(self, piece: str, as_text: bool) -> list[int]:
        """``piece``'s ids as they would follow earlier text: encoded after a newline whose ids are then dropped,
        so a tokenizer that marks the start of a text (SentencePiece's leading space) does not mark this one."""
        anchor = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        ids = self.tokenizer("\n" + piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
        if anchor and ids[:len(anchor)] == anchor:
            return ids[len(anchor):]
        return self.tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

