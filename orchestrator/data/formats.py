"""Record formats -> token ids and which of them carry loss.

* ``text``: one field of raw text; every token carries loss.
* ``chat``: ``messages`` lists of ``{role, content}`` rendered with the tokenizer's chat
  template; loss on the assistant turns only (their content and end-of-turn marker).
* ``instruction``: alpaca-style ``instruction``, optional ``input``, ``output``, rendered with
  :data:`INSTRUCTION_PROMPT`; loss on the output.
* ``completion``: ``prompt`` and ``completion``; loss on the completion.

``train_on_prompt`` puts loss on every token. Each encoder returns ``(ids, mask)``: equal-length
lists, ``mask[i]`` true where token ``i`` is a target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.errors import UsageError

INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_PROMPT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Encoded = tuple[list[int], list[bool]]


def _field(record: dict[str, Any], name: str, fmt: str, index: int) -> Any:
    if name not in record or record[name] is None:
        raise UsageError(
            f"data.format: record {index} has no '{name}' field, which format '{fmt}' needs "
            f"(it has: {', '.join(sorted(record)) or 'nothing'})"
        )
    return record[name]


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _prompt_response(tokenizer: Any, prompt: str, response: str, train_on_prompt: bool) -> Encoded:
    """The prompt (with the tokenizer's own leading special tokens) then the response and
    EOS; tokenized apart so the boundary between them is exact."""
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    eos = _eos(tokenizer)
    if eos and head and head[-1] == eos[0]:  # tokenizers that append EOS to every text
        head = head[:-1]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    return head + tail, [train_on_prompt] * len(head) + [True] * len(tail)


def encode_texts(tokenizer: Any, texts: list[str]) -> list[Encoded]:
    """Raw texts (tokenized as one batch) each plus EOS; every token is a target."""
    eos = _eos(tokenizer)
    out: list[Encoded] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        if eos and (not ids or ids[-1] != eos[0]):
            ids = [*ids, *eos]
        out.append((ids, [True] * len(ids)))
    return out


def encode_text(tokenizer: Any, text: str) -> Encoded:
    """Raw text plus EOS; every token is a target."""
    return encode_texts(tokenizer, [text])[0]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    try:
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )
    except Exception as exc:  # no template (ValueError) or the template's own jinja errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"data.format: chat: the tokenizer's chat template cannot render a conversation "
            f"({first}): fix the template or the records' roles"
        ) from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns.

    Each turn's range is found by rendering the conversation prefix by prefix: it starts
    where the prefix before it (with the generation prompt, so the assistant header is not
    a target) ends and stops where the prefix through it ends, so it takes the template's
    end-of-turn marker with it. Templates whose renders are not prefixes of each other fall
    back to locating the turn's content in the text."""
    full = _render(tokenizer, messages, False)
    spans: list[range] = []
    cursor = 0
    for j, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:j], True) if j else ""
        if not full.startswith(before):
            before = _render(tokenizer, messages[:j], False) if j else ""
        through = _render(tokenizer, messages[: j + 1], False)
        if full.startswith(before) and full.startswith(through) and len(through) > len(before):
            start, end = len(before), len(through)
        else:
            content = str(message.get("content") or "")
            start = full.find(content, cursor)
            if start < 0 or not content:
                continue
            end = start + len(content)
        spans.append(range(max(start, cursor), end))
        cursor = end
    return full, spans


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], train_on_prompt: bool) -> Encoded:
    """A conversation through the chat template; targets are the assistant turns' tokens
    (tokens whose first character lies in an assistant span)."""
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, [True] * len(ids)
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(end > start and any(start in span for span in spans))
    return ids, mask


def encoder(
    fmt: str, text_field: str, train_on_prompt: bool
) -> Callable[[Any, dict, int], Encoded]:
    """The per-record encoder ``(tokenizer, record, index) -> (ids, mask)`` of a format."""

    def text(tok: Any, record: dict[str, Any], i: int) -> Encoded:
        return encode_text(tok, str(_field(record, text_field, fmt, i)))

    def chat(tok: Any, record: dict[str, Any], i: int) -> Encoded:
        messages = _field(record, "messages", fmt, i)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise UsageError(
                f"data.format: record {i}: 'messages' must be a list of {{role, content}}"
            )
        return encode_chat(tok, messages, train_on_prompt)

    def instruction(tok: Any, record: dict[str, Any], i: int) -> Encoded:
        inst = str(_field(record, "instruction", fmt, i))
        extra = record.get("input") or ""
        prompt = (
            INSTRUCTION_INPUT_PROMPT.format(instruction=inst, input=extra)
            if extra
            else INSTRUCTION_PROMPT.format(instruction=inst)
        )
        return _prompt_response(tok, prompt, str(_field(record, "output", fmt, i)), train_on_prompt)

    def completion(tok: Any, record: dict[str, Any], i: int) -> Encoded:
        prompt = str(_field(record, "prompt", fmt, i))
        return _prompt_response(
            tok, prompt, str(_field(record, "completion", fmt, i)), train_on_prompt
        )

    return {"text": text, "chat": chat, "instruction": instruction, "completion": completion}[fmt]
