"""Prompt formats: infilling (PSM / SPM) and instruct dialogs (Llama 2 ``[INST]`` and 70B ``<step>``).

Pure functions from text to token ids, with the validation the reference does by ``assert``
turned into ``ValueError``s that say what is wrong.
"""

from __future__ import annotations

from typing import List, Literal, Sequence, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict, total=False):
    """One turn of a dialog, as Meta's reference types it (``destination`` only in 70B-Instruct's format)."""

    role: Role
    content: str
    destination: str


Dialog = Sequence[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")


def infilling_prompt_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> List[int]:
    """The fill-in-the-middle prompt.

    PSM: ``<s> <PRE> prefix <SUF>suffix <MID>``; SPM (``suffix_first``): ``<s> <PRE> <SUF>suffix <MID> prefix``.
    The prefix keeps SentencePiece's leading space; the suffix, which continues mid-line, does not.
    """
    tokenizer.require_infilling()
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError(f"prefix and suffix must be str, got {type(prefix).__name__} and {type(suffix).__name__}")
    t = tokenizer
    if suffix_first:
        return ([t.bos_id, t.prefix_id, t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id]
                + t.encode(prefix, bos=False, eos=False))
    return ([t.bos_id, t.prefix_id] + t.encode(prefix, bos=False, eos=False) + [t.suffix_id]
            + t.encode_infilling(suffix) + [t.middle_id])


def has_special_tags(dialog: Dialog) -> bool:
    """True when any message carries a tag of the prompt format (prompt injection, refused by the reference)."""
    return any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS)


def validate_dialog(dialog: Dialog, index: int = 0) -> None:
    """Check message shape and roles: optional leading system message, then user/assistant alternating, ending with user."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"{where}, message {i}: expected {{'role': str, 'content': str}}, got {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(f"{where}, message {i}: unknown role {msg['role']!r}; valid roles: {', '.join(ROLES)}")
    body = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise ValueError(f"{where}: roles must be an optional 'system' message, then 'user' and 'assistant' "
                             f"alternating, starting with 'user'; message {i + len(dialog) - len(body)} is "
                             f"{msg['role']!r} where {want!r} was expected")
    if not body or body[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be from the user, got {dialog[-1]['role']!r}")


def chat_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Llama 2 / Code Llama Instruct format: ``<s>[INST] user [/INST] answer </s><s>[INST] user [/INST]``."""
    validate_dialog(dialog)
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    tokens: List[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                   bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def step_dialog_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Code Llama 70B-Instruct format: ``Source: role`` headers, bodies after a blank line, ``<step>`` between turns."""
    if tokenizer.step_id is None:
        raise ValueError("this tokenizer has no <step> piece: use chat_prompt_tokens (the [INST] format)")
    validate_dialog(dialog)
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}] + list(dialog)
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        header = f"Source: {msg['role'].strip()}"
        if msg.get("destination") is not None:
            header += f"\nDestination: {msg['destination'].strip()}"
        tokens += tokenizer.encode(" " + header, bos=False, eos=False)
        if msg["content"]:
            tokens += tokenizer.encode("\n\n " + msg["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user", bos=False, eos=False)
    tokens += tokenizer.encode("\n\n ", bos=False, eos=False)
    return tokens
