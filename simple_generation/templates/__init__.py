"""Named chat templates, compatible with FastChat's conversation templates (fschat 0.2.36).

The templates are data (``fastchat_templates.json``, extracted from FastChat by
``scripts/make_template_golden.py``); :func:`render_conversation` renders any of them for any
conversation, equal byte for byte to FastChat's ``Conversation.get_prompt()``.

Example:
    >>> from simple_generation import render_conversation
    >>> render_conversation("vicuna_v1.1", [{"role": "user", "content": "Hi!"}])[-21:]
    ' USER: Hi! ASSISTANT:'
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

# The original simple-generation README's names for two FastChat templates.
ALIASES = {"vicuna_one_shot": "one_shot", "vicuna_zero_shot": "zero_shot"}


@dataclass(frozen=True)
class Template:
    """One conversation template: how system message, roles and separators make a prompt."""

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: tuple[tuple[str, str | None], ...] = ()  # built-in turns (few-shot examples)
    offset: int = 0
    sep_style: str | None = "ADD_COLON_SINGLE"
    sep: str | None = "\n"
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids_: tuple[int, ...] | None = None
    round_start: int = 0

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end an answer (not included in it): FastChat's ``stop_str``, plus the marker that
        opens the next user turn (Vicuna's ``USER:``, Llama-2's ``[INST]``...), so that a model which goes on
        to write the user's next message stops there."""
        listed = [] if self.stop_str is None else [self.stop_str] if isinstance(self.stop_str, str) \
            else list(self.stop_str)
        marker = self.user_turn_marker
        return listed + ([marker] if marker and marker not in listed else [])

    @functools.cached_property
    def user_turn_marker(self) -> str | None:
        """What the prompt puts between an answer and the next user message, minus the answer's separator.

        Found by rendering a two-turn conversation, so it holds for every separator style. None when the
        marker is empty, changes from turn to turn (ChatGLM's round numbers), or is too plain to be safe.
        """
        if _STYLES.get(self.sep_style or "") is None:
            return None
        tags = [f"\x00{i}\x00" for i in range(5)]
        text = render_conversation(self, [{"role": "user" if i % 2 == 0 else "assistant", "content": tag}
                                          for i, tag in enumerate(tags)])
        markers = {self._strip_answer_sep(text[text.index(tags[i]) + len(tags[i]):text.index(tags[i + 1])])
                   for i in (1, 3)}
        marker = markers.pop()
        if markers or len(marker) < 3:
            return None
        return marker

    def _strip_answer_sep(self, between: str) -> str:
        for sep in sorted({s for s in (self.sep2, self.sep) if s and s.strip()}, key=len, reverse=True):
            if between.startswith(sep):
                between = between[len(sep):]
                break
        return between.strip()

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer, besides the model's EOS."""
        return list(self.stop_token_ids_ or ())


@functools.cache
def _registry() -> dict[str, Template]:
    data = resources.files("simple_generation.templates").joinpath("fastchat_templates.json")
    text = data.read_text(encoding="utf-8")
    templates = {}
    for entry in json.loads(text)["templates"]:
        templates[entry["name"]] = Template(
            name=entry["name"], system_template=entry["system_template"], system_message=entry["system_message"],
            roles=tuple(entry["roles"]), messages=tuple((r, m) for r, m in entry["messages"]),
            offset=entry["offset"], sep_style=entry["sep_style"], sep=entry["sep"], sep2=entry["sep2"],
            stop_str=entry["stop_str"],
            stop_token_ids_=tuple(entry["stop_token_ids"]) if entry["stop_token_ids"] else None,
            round_start=entry.get("round_start", 0),
        )
    return templates


def available_system_prompts() -> list[str]:
    """Every template name, sorted: FastChat's plus the original README's aliases.

    Example:
        >>> "llama-2" in available_system_prompts()
        True
    """
    return sorted([*_registry(), *ALIASES])


def get_template(name: str) -> Template:
    """The template registered under ``name`` (or an alias); unknown names raise with the closest ones."""
    registry = _registry()
    key = ALIASES.get(name, name)
    if key in registry:
        return registry[key]
    close = difflib.get_close_matches(name, available_system_prompts(), n=3, cutoff=0.5)
    suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown template {name!r}.{suggestion} See available_system_prompts() for all names.")


# ------------------------------------------------------------------ rendering
# Each style gets (template, system prompt, [(role, content or None)]) and returns the prompt. A falsy
# content (None or "") is a turn still to be answered, as in FastChat.
Turns = list[tuple[str, str | None]]


def _colon_single(t: Template, system: str, turns: Turns, space: bool = False) -> str:
    out = system + t.sep
    for role, content in turns:
        out += f"{role}: {content}{t.sep}" if content else role + (": " if space else ":")
    return out


def _colon_two(t: Template, system: str, turns: Turns, sep_after_system: bool = True) -> str:
    seps = (t.sep, t.sep2)
    out = system + t.sep if sep_after_system else system
    for i, (role, content) in enumerate(turns):
        out += f"{role}: {content}{seps[i % 2]}" if content else role + ":"
    return out


def _new_line_single(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep if system else ""
    for role, content in turns:
        out += f"{role}\n{content}{t.sep}" if content else role + "\n"
    return out


def _no_colon(t: Template, system: str, turns: Turns, two: bool = False) -> str:
    seps = (t.sep, t.sep2 if two else t.sep)
    out = system
    for i, (role, content) in enumerate(turns):
        out += role + content + seps[i % 2] if content else role
    return out


def _rwkv(t: Template, system: str, turns: Turns) -> str:
    out = system
    for role, content in turns:
        out += f"{role}: {content.replace(chr(13) + chr(10), chr(10)).replace(chr(10) * 2, chr(10))}\n\n" \
            if content else role + ":"
    return out


def _llama2(t: Template, system: str, turns: Turns) -> str:
    seps = (t.sep, t.sep2)
    out = system if t.system_message else "[INST] "
    for i, (_, content) in enumerate(turns):
        tag = t.roles[i % 2]
        if not content:
            out += tag
        elif i == 0:
            out += content + " "
        else:
            out += f"{tag} {content}{seps[i % 2]}"
    return out


def _chatglm(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep if system else ""
    for i, (role, content) in enumerate(turns):
        if i % 2 == 0:
            out += f"[Round {i // 2 + t.round_start}]{t.sep}"
        out += f"{role}：{content}{t.sep}" if content else f"{role}："
    return out


def _chatml(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep + "\n" if system else ""
    for role, content in turns:
        out += f"{role}\n{content}{t.sep}\n" if content else role + "\n"
    return out


def _chatglm3(t: Template, system: str, turns: Turns) -> str:
    out = system if t.system_message else ""
    for role, content in turns:
        out += f"{role}\n{content}" if content else role
    return out


def _chatintern(t: Template, system: str, turns: Turns) -> str:
    seps = (t.sep, t.sep2)
    out = system
    for i, (role, content) in enumerate(turns):
        if i % 2 == 0:
            out += "<s>"
        out += f"{role}:{content}{seps[i % 2]}\n" if content else role + ":"
    return out


def _dolly(t: Template, system: str, turns: Turns) -> str:
    seps = (t.sep, t.sep2)
    out = system
    for i, (role, content) in enumerate(turns):
        if content:
            out += f"{role}:\n{content}{seps[i % 2]}" + ("\n\n" if i % 2 == 1 else "")
        else:
            out += role + ":\n"
    return out


def _phoenix(t: Template, system: str, turns: Turns) -> str:
    out = system
    for role, content in turns:
        out += f"{role}: <s>{content}</s>" if content else f"{role}: <s>"
    return out


def _robin(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep
    for role, content in turns:
        out += f"{role}:\n{content}{t.sep}" if content else role + ":\n"
    return out


def _falcon_chat(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep if t.system_message else ""
    for role, content in turns:
        out += f"{role}: {content}{t.sep}" if content else role + ":"
    return out


def _metamath(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep if system else ""
    for i, (role, content) in enumerate(turns):
        # the answer's prefix comes from sep2; the question ends with sep
        start = ":\n" if i % 2 == 0 else ": " + t.sep2
        out += role + start + (content + (t.sep if i % 2 == 0 else "") if content else "")
    return out


def _yuan2(t: Template, system: str, turns: Turns) -> str:
    out = system + t.sep2 if t.system_message else ""
    for _, content in turns:
        out += content + "<n>" if content else ""
    # FastChat strips any trailing '<', 'n' and '>' characters here (str.rstrip), not just "<n>"
    return out.rstrip("<n>") + t.sep


_STYLES: dict[str, Callable[[Template, str, Turns], str]] = {
    "ADD_COLON_SINGLE": _colon_single,
    "ADD_COLON_TWO": _colon_two,
    "ADD_COLON_SPACE_SINGLE": functools.partial(_colon_single, space=True),
    "NO_COLON_SINGLE": _no_colon,
    "NO_COLON_TWO": functools.partial(_no_colon, two=True),
    "ADD_NEW_LINE_SINGLE": _new_line_single,
    "LLAMA2": _llama2,
    "CHATGLM": _chatglm,
    "CHATML": _chatml,
    "CHATINTERN": _chatintern,
    "DOLLY": _dolly,
    "RWKV": _rwkv,
    "PHOENIX": _phoenix,
    "ROBIN": _robin,
    "FALCON_CHAT": _falcon_chat,
    "CHATGLM3": _chatglm3,
    "DEEPSEEK_CHAT": functools.partial(_colon_two, sep_after_system=False),
    "METAMATH": _metamath,
    "YUAN2": _yuan2,
}


def render_conversation(template: str | Template, messages: Sequence[dict[str, str]],
                        system_message: str | None = None) -> str:
    """The prompt for ``messages`` (``{"role": "user"|"assistant"|"system", "content": ...}``).

    A leading ``system`` message (or ``system_message``) replaces the template's system message. The
    template's built-in turns come first; when the last message is the user's, an empty assistant turn
    follows, so the model answers next. Equal to FastChat's ``get_prompt()`` byte for byte.

    Example:
        >>> render_conversation("llama-2", [{"role": "user", "content": "Hi"}], system_message="Be nice.")
        '[INST] <<SYS>>\\nBe nice.\\n<</SYS>>\\n\\nHi [/INST]'
    """
    template = get_template(template) if isinstance(template, str) else template
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system_message = messages[0]["content"]
        messages = messages[1:]
    if system_message is not None:
        template = _with_system_message(template, system_message)
    style = _STYLES.get(template.sep_style or "")
    if style is None:
        raise ValueError(
            f"The template {template.name!r} is for an API model and has no text prompt (FastChat cannot render "
            "it either); pick another template or use apply_chat_template=True."
        )
    turns: Turns = list(template.messages)
    for position, message in enumerate(messages):
        if message["role"] not in ("user", "assistant"):
            raise ValueError(f"Message {position} has role {message['role']!r}; only the first message may be "
                             "'system', the others are 'user' or 'assistant'.")
        turns.append((template.roles[0 if message["role"] == "user" else 1], message["content"]))
    if messages and messages[-1]["role"] == "user":
        turns.append((template.roles[1], None))
    system = template.system_template.format(system_message=template.system_message)
    return style(template, system, turns)


def format_prompt(template: str | Template, user_prompt: str, system_message: str | None = None) -> str:
    """One user turn followed by the assistant's empty turn."""
    return render_conversation(template, [{"role": "user", "content": user_prompt}], system_message)


def _with_system_message(template: Template, system_message: str) -> Template:
    return dataclasses.replace(template, system_message=system_message)
