"""Conversation rendering: token layout, training mask, truncation, and errors for malformed input."""
import pytest

from nanochat.conversation import render_conversation, render_for_completion
from tests.helpers_chat import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sp(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_layout_and_mask(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me see. "},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
    ]}
    ids, mask = render_conversation(tok, conv)
    e = tok.encode
    expected = (
        [(tok.get_bos_token_id(), 0), (sp(tok, "user_start"), 0)] + [(t, 0) for t in e("What is 2+2?")]
        + [(sp(tok, "user_end"), 0), (sp(tok, "assistant_start"), 0)]
        + [(t, 1) for t in e("Let me see. ")]
        + [(sp(tok, "python_start"), 1)] + [(t, 1) for t in e("2+2")] + [(sp(tok, "python_end"), 1)]
        + [(sp(tok, "output_start"), 0)] + [(t, 0) for t in e("4")] + [(sp(tok, "output_end"), 0)]
        + [(t, 1) for t in e("It is 4.")] + [(sp(tok, "assistant_end"), 1)]
        + [(sp(tok, "user_start"), 0)] + [(t, 0) for t in e("thanks")] + [(sp(tok, "user_end"), 0)]
        + [(sp(tok, "assistant_start"), 0)] + [(t, 1) for t in e("you are welcome")]
        + [(sp(tok, "assistant_end"), 1)]
    )
    assert list(zip(ids, mask)) == expected
    assert tok.decode(ids).startswith("<|bos|><|user_start|>What is 2+2?<|user_end|>")


def test_system_message_is_merged_into_first_user(tok):
    with_system, _ = render_conversation(tok, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]})
    merged, _ = render_conversation(tok, {"messages": [
        {"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "hello"}]})
    assert with_system == merged


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "a long question " * 20},
                         {"role": "assistant", "content": "an even longer answer " * 20}]}
    full_ids, full_mask = render_conversation(tok, conv)
    ids, mask = render_conversation(tok, conv, max_tokens=17)
    assert len(ids) == len(mask) == 17 < len(full_ids)
    assert ids == full_ids[:17] and mask == full_mask[:17]


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt = render_for_completion(tok, conv)
    assert prompt == ([tok.get_bos_token_id(), sp(tok, "user_start")] + tok.encode("hi")
                      + [sp(tok, "user_end"), sp(tok, "assistant_start")])
    assert render_for_completion(tok, {"messages": conv["messages"][:1]}) == prompt


def test_special_strings_in_text_are_plain_text(tok):
    ids, _ = render_conversation(tok, {"messages": [{"role": "user", "content": "<|assistant_end|>"}]})
    assert ids.count(sp(tok, "assistant_end")) == 0


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty"),
    ([{"role": "user", "content": "   "}], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed first"),
    ([{"role": "system", "content": "b"}], "only a system"),
    ([{"role": "user"}], "message 0"),
    ([{"role": "user", "content": 5}], "must be a string"),
])
def test_malformed(tok, messages, needle):
    with pytest.raises(ValueError, match=needle):
        render_conversation(tok, {"messages": messages})


def test_not_a_conversation(tok):
    with pytest.raises(ValueError, match="messages"):
        render_conversation(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="message 2"):
        render_for_completion(tok, {"messages": [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"},
                                                 {"role": "assistant", "content": "c"}]})
