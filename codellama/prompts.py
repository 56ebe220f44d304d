"""Prompt formats: infilling (PSM / SPM) and instruct dialogs (Llama 2 ``[INST]`` and 70B ``<step>``).

Pure functions from text to token ids, with the validation the reference does by ``assert``
turned into ``ValueError``s that say what is wrong.
"""

from __future__ import annotations

from typing import List, Literal, Sequence, Tuple, TypedDict

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


def validate_dialog(dialog: Dialog, index: int = 0, *, prefill: bool = False) -> None:
    """Check message shape and roles: optional leading system message, then user/assistant alternating, ending with
    user; with ``prefill``, ending with the assistant's answer so far (see :func:`split_prefill`)."""
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
    last = "assistant" if prefill else "user"
    if not body or body[-1]["role"] != last:
        raise ValueError(f"{where}: the last message must be from the {last}, got {dialog[-1]['role']!r}")


def split_prefill(dialog: Dialog) -> Tuple[Dialog, str]:
    """``(dialog, answer so far)``: a dialog ending with an assistant message asks for that answer to be continued
    (a "prefill", as llama.cpp and vLLM allow); any other dialog has no answer so far (``""``)."""
    if isinstance(dialog, (list, tuple)) and len(dialog) > 1 and isinstance(dialog[-1], dict) \
            and dialog[-1].get("role") == "assistant":
        validate_dialog(dialog, prefill=True)
        return list(dialog[:-1]), dialog[-1]["content"]
    return dialog, ""


def chat_stop_ids(tokenizer: Tokenizer, step_format: bool) -> Tuple[int, ...]:
    """The ids that end a chat answer: the format's end of turn (``<step>`` in 70B-Instruct's format, EOS in
    ``[INST]``'s), and every other control piece. A model that also learnt infilling may write ``<EOT>`` (or a
    stray ``<MID>``) to end its answer; as a control id it is never text, so the answer ends there."""
    end = tokenizer.step_id if step_format else tokenizer.eos_id
    return (end,) + tuple(sorted(tokenizer.control_ids - {end}))


def chat_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Llama 2 / Code Llama Instruct format: ``<s>[INST] user [/INST] answer </s><s>[INST] user [/INST]``.

    A dialog ending with an assistant message continues that answer: ``… [/INST] {answer so far}`` (its leading
    whitespace the format's one space, the rest verbatim), without EOS; what the model writes next is the rest of
    it, so that the answer so far followed by the new text reads as one answer.
    """
    dialog, prefill = split_prefill(dialog)
    validate_dialog(dialog)
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    tokens: List[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                   bos=True, eos=True)
    last = f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}"
    if prefill.strip():
        last += " " + prefill.lstrip()
    tokens += tokenizer.encode(last, bos=True, eos=False)
    return tokens


def step_dialog_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Code Llama 70B-Instruct format: ``Source: role`` headers, bodies after a blank line, ``<step>`` between turns.

    A dialog ending with an assistant message continues that answer (its body so far, without ``<step>``)."""
    if tokenizer.step_id is None:
        raise ValueError("this tokenizer has no <step> piece: use chat_prompt_tokens (the [INST] format)")
    dialog, prefill = split_prefill(dialog)
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
    tokens += tokenizer.encode("\n\n " + prefill.lstrip(), bos=False, eos=False)
    return tokens
