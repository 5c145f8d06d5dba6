"""Record formats: which tokens carry loss in each, decoded back to text."""

from __future__ import annotations

import pytest

from orchestrator.data.formats import assistant_spans, encoder
from orchestrator.errors import UsageError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is os.path.join?"},
    {"role": "assistant", "content": "It joins path parts."},
    {"role": "user", "content": "And basename?"},
    {"role": "assistant", "content": "The final component."},
]


def targets(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def prompt_part(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])


def test_chat_loss_is_on_assistant_turns_only(tokenizer):
    ids, mask = encoder("chat", "text", False)(tokenizer, {"messages": CHAT}, 0)
    assert targets(tokenizer, ids, mask) == (
        "It joins path parts.<|im_end|>\nThe final component.<|im_end|>\n"
    )
    rest = prompt_part(tokenizer, ids, mask)
    assert "Be brief." in rest and "And basename?" in rest and "<|im_start|>assistant\n" in rest
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_chat_spans_fall_back_to_the_content_for_non_prefix_templates(tokenizer, monkeypatch):
    # A template that renders the last turn differently: renders are not prefixes of each other.
    template = tokenizer.chat_template
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% for m in messages %}[{{ m['role'] }}{% if loop.last %}!{% endif %}] "
        "{{ m['content'] }}\n{% endfor %}",
    )
    full, spans = assistant_spans(tokenizer, CHAT)
    assert [full[s.start : s.stop] for s in spans] == [
        "It joins path parts.",
        "The final component.",
    ]
    tokenizer.chat_template = template


def test_train_on_prompt_puts_loss_everywhere(tokenizer):
    for fmt, record in [
        ("chat", {"messages": CHAT}),
        ("instruction", {"instruction": "Add", "input": "1 2", "output": "3"}),
        ("completion", {"prompt": "2+2=", "completion": "4"}),
    ]:
        ids, mask = encoder(fmt, "text", True)(tokenizer, record, 0)
        assert all(mask) and len(ids) == len(mask)


def test_instruction_loss_is_on_the_output_and_eos(tokenizer):
    record = {"instruction": "Name the function.", "input": "it splits paths", "output": "split"}
    ids, mask = encoder("instruction", "text", False)(tokenizer, record, 0)
    assert targets(tokenizer, ids, mask) == "split</s>"
    prompt = prompt_part(tokenizer, ids, mask)
    assert (
        "### Instruction:\nName the function." in prompt and "### Input:\nit splits paths" in prompt
    )
    no_input = encoder("instruction", "text", False)(
        tokenizer, {"instruction": "x", "output": "y"}, 0
    )
    assert "### Input" not in tokenizer.decode(no_input[0])


def test_completion_loss_is_on_the_completion(tokenizer):
    ids, mask = encoder("completion", "text", False)(
        tokenizer, {"prompt": "The answer is", "completion": " forty-two"}, 0
    )
    assert targets(tokenizer, ids, mask) == " forty-two</s>"
    assert prompt_part(tokenizer, ids, mask) == "The answer is"


def test_text_is_all_targets_with_eos(tokenizer):
    ids, mask = encoder("text", "body", False)(tokenizer, {"body": "plain words"}, 0)
    assert all(mask) and tokenizer.decode(ids) == "plain words</s>"


@pytest.mark.parametrize(
    ("fmt", "record", "needle"),
    [
        ("chat", {"text": "x"}, "record 7 has no 'messages' field"),
        ("chat", {"messages": [{"role": "user"}]}, "list of {role, content}"),
        ("instruction", {"instruction": "x"}, "no 'output' field"),
        ("completion", {"prompt": "x"}, "no 'completion' field"),
        ("text", {"content": "x"}, "no 'text' field"),
    ],
)
def test_a_record_missing_its_fields_is_a_usage_error(tokenizer, fmt, record, needle):
    with pytest.raises(UsageError, match="data.format") as err:
        encoder(fmt, "text", False)(tokenizer, record, 7)
    assert needle in str(err.value)


def test_a_template_that_fails_is_a_usage_error(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UsageError, match="chat template cannot render.*roles must alternate"):
        encoder("chat", "text", False)(tokenizer, {"messages": CHAT}, 0)
