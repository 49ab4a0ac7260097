"""Turn user prompts or conversations into the exact text the model is fed.

Three ways, one active per generator:

- a named FastChat-compatible template (``system_prompt="vicuna_v1.1"``), see :mod:`.templates`;
- the tokenizer's own chat template (``apply_chat_template=True``);
- neither: plain strings go through unchanged.

Conversations (lists of ``{"role", "content"}`` messages) need one of the first two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .templates import get_template, render_conversation

logger = logging.getLogger("simple_generation")

Message = dict[str, str]
_ROLES = ("system", "user", "assistant")


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


def _validate_messages(messages: Sequence[Any], where: str) -> None:
    if not messages:
        raise ValueError(f"{where} is an empty conversation.")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in _ROLES:
            raise TypeError(
                f"{where}[{position}] must be a dict with 'role' in {_ROLES} and a str 'content', got {message!r}."
            )


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
    ):
        if template is not None and apply_chat_template:
            raise ValueError("Pass either system_prompt=<template name> or apply_chat_template=True, not both.")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.system_message = system_message
        self.apply_chat_template = apply_chat_template
        self.add_generation_prompt = add_generation_prompt
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "apply_chat_template=True, but this tokenizer has no chat template. Pick a named template "
                "(system_prompt=..., see available_system_prompts()) or set tokenizer.chat_template."
            )
        if system_message is not None and self.template is None and not apply_chat_template:
            raise ValueError("system_message needs a template: pass system_prompt=<name> or apply_chat_template=True.")

    @property
    def formats_conversations(self) -> bool:
        """Whether message lists can be formatted: a named template, or a tokenizer with a chat template."""
        return self.template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def stop_strings(self) -> list[str]:
        return self.template.stop_strings if self.template is not None else []

    @property
    def stop_token_ids(self) -> list[int]:
        return self.template.stop_token_ids if self.template is not None else []

    def messages_for(self, item: str | list[Message]) -> list[Message]:
        return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)

    def format_one(self, item: str | list[Message]) -> str:
        if self.template is not None:
            return render_conversation(self.template, self.messages_for(item), self.system_message)
        if self.apply_chat_template or not isinstance(item, str):
            return self._apply_chat_template(self.messages_for(item))
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
        """Token ids; a prompt whose text already starts with the BOS token gets no second one."""
        bos = self.tokenizer.bos_token
        carries_bos = [bool(bos) and p.startswith(bos) for p in prompts]
        ids: list[list[int] | None] = [None] * len(prompts)
        for flag in (False, True):
            group = [i for i, c in enumerate(carries_bos) if c == flag]
            if group:
                encoded = self.tokenizer([prompts[i] for i in group], add_special_tokens=not flag)["input_ids"]
                for i, row in zip(group, encoded):
                    ids[i] = row
        return ids  # type: ignore[return-value]

