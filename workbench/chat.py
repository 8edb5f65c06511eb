"""Chat templates, message boundaries, prefill, and the chat result types.

>>> import workbench as wb
>>> r = wb.ChatResponse(prefill='{"a": ', generated='1}')
>>> r.full_text(), r.to_message()
('{"a": 1}', {'role': 'assistant', 'content': '{"a": 1}'})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EmptyInputError, ValidationError

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer")
# apply_chat_template keywords that change what it returns: the workbench renders text and
# tokenizes it itself (it needs the character offsets for message boundaries)
_RESERVED_CHAT_OPTIONS = ("tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask", "conversation")


@dataclass
class MessageBoundary:
    """Where message ``index`` lies in the rendered prompt: tokens ``[start_token, end_token)``."""

    index: int
    role: str
    content: str
    start_token: int
    end_token: int

    @property
    def num_tokens(self) -> int:
        return self.end_token - self.start_token


class ChatResponse(str):
    """One chat reply: an optional assistant ``prefill`` the model continued, and what it ``generated``.

    It is the reply's full text as a ``str`` (chatspace code slices, prints, compares and joins its
    replies), with the parts and details as attributes.

    >>> r = ChatResponse(prefill="Ahoy", generated=", matey!")
    >>> r[:4], len(r), r == "Ahoy, matey!", r.generated
    ('Ahoy', 12, True, ', matey!')
    """

    prefill: str
    generated: str
    token_ids: list
    finish_reason: str | None
    projections: object  # monitor.Projections when the chat was monitored (or its spec conditional)

    def __new__(cls, prefill: str = "", generated: str = "", token_ids=None, finish_reason: str | None = None,
                projections=None):
        self = super().__new__(cls, prefill + generated)
        self.prefill, self.generated = prefill, generated
        self.token_ids = list(token_ids or [])
        self.finish_reason = finish_reason
        self.projections = projections
        return self

    @property
    def has_prefill(self) -> bool:
        return bool(self.prefill)

    def full_text(self) -> str:
        return self.prefill + self.generated

    def to_message(self) -> dict:
        """The reply as a message to append to the conversation."""
        return {"role": "assistant", "content": self.full_text()}

    def __repr__(self) -> str:
        return (f"ChatResponse(prefill={self.prefill!r}, generated={self.generated!r}, "
                f"token_ids=<{len(self.token_ids)} tokens>, finish_reason={self.finish_reason!r})")

    def __reduce__(self):  # str subclasses pickle by value only; keep the parts
        return (ChatResponse, (self.prefill, self.generated, self.token_ids, self.finish_reason, self.projections))


@dataclass
class StreamChunk:
    """A piece of a streamed reply: the new ``text``, the new ``token_ids``, and at the end a ``finish_reason``."""

    text: str
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    projections: object = None     # monitor.ProjectionDelta (monitored streams): values computed since the last chunk
    monitor_header: dict | None = None  # first chunk of a monitored stream: probe names, layers, prompt tokens


def normalize_conversations(messages_or_conversations) -> tuple[list[list[dict]], bool]:
    """Accept one conversation (list of dicts) or many; return (conversations, was_single)."""
    if isinstance(messages_or_conversations, dict):
        messages_or_conversations = [messages_or_conversations]
    if not isinstance(messages_or_conversations, (list, tuple)) or len(messages_or_conversations) == 0:
        raise EmptyInputError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages_or_conversations!r}")
    single = isinstance(messages_or_conversations[0], dict)
    convs = [list(messages_or_conversations)] if single else [list(c) if isinstance(c, (list, tuple)) else c for c in messages_or_conversations]
    for ci, conv in enumerate(convs):
        where = "messages" if single else f"conversations[{ci}]"
        if not isinstance(conv, list) or not conv:
            raise EmptyInputError(f"{where} must be a non-empty list of messages, got {conv!r}")
        for mi, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise ValidationError(f"{where}[{mi}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
            role, content = msg.get("role"), msg.get("content")
            if role not in ALLOWED_ROLES:
                raise ValidationError(f"{where}[{mi}] has unknown role {role!r}; allowed: {list(ALLOWED_ROLES)}")
            if not isinstance(content, str):
                raise ValidationError(f"{where}[{mi}].content must be a string, got {type(content).__name__}")
        if not any(msg["content"].strip() for msg in conv):
            raise EmptyInputError(f"{where} has no text: every message's content is empty")
    return convs, single


def check_chat_options(chat_options: dict | None) -> dict:
    """Validate ``chat_options``: any ``apply_chat_template`` keyword, as transformers and vLLM take them.

    >>> check_chat_options({"enable_thinking": False})["add_generation_prompt"]
    True
    """
    if chat_options is not None and not isinstance(chat_options, dict):
        raise ValidationError(f"chat_options must be a dict of apply_chat_template keywords, got {type(chat_options).__name__}")
    opts = dict(chat_options or {})
    bad = [k for k in opts if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValidationError(f"chat_options keys must be keyword names, got {bad!r}")
    reserved = sorted(set(opts) & set(_RESERVED_CHAT_OPTIONS))
    if reserved:
        raise ValidationError(f"chat_options {reserved} cannot be set: the workbench renders the template to text and "
                              f"tokenizes it itself (it needs the offsets for message boundaries)")
    if opts.get("continue_final_message"):
        opts.setdefault("add_generation_prompt", False)
        if opts["add_generation_prompt"]:
            raise ValidationError("chat_options: continue_final_message=True needs add_generation_prompt=False")
    opts.setdefault("add_generation_prompt", True)
    return opts


@dataclass
class RenderedChat:
    """A conversation rendered through the chat template and tokenized."""

    text: str
    token_ids: list
    boundaries: list
    prefill: str


def render_chat(tokenizer, messages: list[dict], chat_options: dict) -> RenderedChat:
    """Render with the tokenizer's chat template; map every prompt token to one message.

    Message ``i`` owns the characters from the end of the rendering of ``messages[:i]`` to the end
    of the rendering of ``messages[:i+1]`` (so template tokens belong to the message they open);
    the generation prompt belongs to the last message. Tokens are assigned by the character at
    which they start, using the fast tokenizer's offsets, so BPE merges across a boundary cannot
    drop or double a token.
    """
    opts = dict(chat_options)
    cont = bool(opts.get("continue_final_message"))
    if cont and messages[-1]["role"] != "assistant":
        raise ValidationError("continue_final_message=True needs the last message to be an assistant prefill")
    kwargs = {k: v for k, v in opts.items() if k not in ("add_generation_prompt", "continue_final_message")}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=bool(opts["add_generation_prompt"]),
            continue_final_message=cont, **kwargs,
        )
    except Exception as exc:  # jinja errors, templates refusing a role order, ...
        raise ValidationError(f"the chat template could not render these messages: {exc}") from exc
    ends = []
    for i in range(1, len(messages)):
        try:
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=False, **kwargs)
        except Exception:
            prefix = None
        ends.append(len(prefix) if isinstance(prefix, str) and text.startswith(prefix) else None)
    ends = _repair_ends(ends, messages, text)
    ends.append(len(text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    boundaries, tok = [], 0
    for i, msg in enumerate(messages):
        first = tok
        while tok < len(ids) and (i == len(messages) - 1 or offsets[tok][0] < ends[i]):
            tok += 1
        boundaries.append(MessageBoundary(i, msg["role"], msg["content"], first, tok))
    return RenderedChat(text=text, token_ids=list(ids), boundaries=boundaries, prefill=messages[-1]["content"] if cont else "")


def _repair_ends(ends: list, messages: list[dict], text: str) -> list:
    """Fill message ends the prefix renderings could not give, from where each content appears."""
    pos, out = 0, []
    for i, end in enumerate(ends):
        if end is None:
            found = text.find(messages[i]["content"], pos)
            end = found + len(messages[i]["content"]) if found >= 0 else pos
        end = max(end, pos)
        out.append(end)
        pos = end
    return out
