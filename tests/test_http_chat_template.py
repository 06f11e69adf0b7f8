"""Chat templates render as transformers' apply_chat_template renders them, in a sandbox."""

from __future__ import annotations

import json

import pytest
from http_fixtures import LLAMA3_TEMPLATE, chat_model_dir

from greenroom.http.chat_template import ChatTemplate, ChatTemplateError, normalize_messages
from greenroom.http.text import TextCodec

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant. "},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "  And of Italy?\n"},
    ],
]

# exercises tojson, loop controls, raise_exception, the generation tag and extra variables
FEATURE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{{ bos_token if loop.first else '' }}[{{ m['role'] }}] "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("tmpl") / "m")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_template_equals_transformers(model_dir, hf, chat, add_generation_prompt) -> None:
    template = ChatTemplate.load(str(model_dir))
    assert template is not None and template.source == LLAMA3_TEMPLATE
    text = template.render(chat, add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == want
    assert text.startswith("<|begin_of_text|>") and text.count("<|begin_of_text|>") == 1
    ids = TextCodec.load(str(model_dir)).encode(text, add_special_tokens=False)
    want_ids = hf.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if hasattr(want_ids, "keys"):
        want_ids = want_ids["input_ids"]
    assert ids == list(want_ids)
    assert ids.count(1) == 1  # one BOS: the template's, none added by the tokenizer


def test_template_features_equal_transformers(tmp_path, hf) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(FEATURE_TEMPLATE)
    template = ChatTemplate.load(None, str(path))
    template.special_tokens.update(bos_token=hf.bos_token, eos_token=hf.eos_token)
    chat = [*CHATS[1], {"role": "skip", "content": "hidden"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    got = template.render(chat, tools=tools)
    want = hf.apply_chat_template(
        chat,
        tools=tools,
        chat_template=FEATURE_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert got == want
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        template.render([{"role": "tool", "content": "x"}])


def test_named_templates_and_chat_template_jinja(tmp_path) -> None:
    d = tmp_path / "named"
    d.mkdir()
    named = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D{{ bos_token }}"},
    ]
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": named, "bos_token": {"content": "<s>", "special": True}})
    )
    assert ChatTemplate.load(str(d)).render([]) == "D<s>"
    (d / "chat_template.jinja").write_text("J")
    assert ChatTemplate.load(str(d)).render([]) == "J"
    assert ChatTemplate.load(str(tmp_path)) is None


def test_the_sandbox_refuses_unsafe_templates() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="parse"):
        ChatTemplate("{% for %}", {})


def test_content_parts_join_and_bad_messages_are_rejected() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert normalize_messages([{"role": "user", "content": parts}])[0]["content"] == "a\nb"
    with pytest.raises(ChatTemplateError, match="role"):
        normalize_messages([{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="image_url"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url"}]}])
