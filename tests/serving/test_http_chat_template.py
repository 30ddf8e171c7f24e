"""Chat templates: rendered as transformers renders them, found where transformers finds them,
and the default model's template writes its claim-review prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pijax.claims.chat_template import default_model_chat_template
from pijax.claims.prompt import policy_scaffold, render_claim, render_prompt
from pijax.claims.samples import sample_example
from pijax.config import DEFAULT_MODEL
from pijax.model.chat_template import ChatTemplate, ChatTemplateError

# Exercises what real templates use: loop controls, tojson, namespace, raise_exception,
# {% generation %} blocks, special tokens, whitespace control under trim/lstrip_blocks.
TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' ~ m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|{{ m['role'] }}|>
    {% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ m['content'] }}
    {% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<|assistant|>{{ ns.n }}{% endif %}"""
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
MESSAGES = [
    {"role": "system", "content": "Review the claim. «Café» ü"},
    {"role": "user", "content": "claim C1 | 99213 x2"},
    {"role": "assistant", "content": '{"flags": []}'},
    {"role": "system", "content": "skipped"},
    {"role": "user", "content": "and C2?"},
]


def test_default_model_template_is_generated_from_the_prompt_format():
    committed = (Path(DEFAULT_MODEL) / "chat_template.jinja").read_text(encoding="utf-8")
    assert committed == default_model_chat_template(), (
        "the default model's chat template is stale (the claims prompt format changed): "
        "python -m pijax.claims.chat_template pijax/data/default_model"
    )


def test_default_model_template_writes_the_claim_review_prompt():
    template = ChatTemplate.from_dir(DEFAULT_MODEL)
    assert template is not None and template.special_tokens["bos_token"] == "<bos>"
    claim = sample_example().claim
    expected = render_prompt(policy_scaffold(), claim)
    assert template.render([{"role": "user", "content": render_claim(claim)}]) == expected
    # A system message replaces the policy; a past review closes with the stop token.
    out = template.render(
        [
            {"role": "system", "content": "P"},
            {"role": "user", "content": "C1"},
            {"role": "assistant", "content": "{}"},
            {"role": "user", "content": "C2"},
        ]
    )
    assert out == "<bos><|policy|>P\n<|claim|>C1\n<|review|>{}<|end|><|claim|>C2\n<|review|>"
    with pytest.raises(ChatTemplateError, match="user or assistant"):
        template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_from_dir_reads_the_jinja_file_first_then_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "chat_template": "config:{{ bos_token }}"})
    )
    assert ChatTemplate.from_dir(tmp_path).render([]) == "config:<s>"
    (tmp_path / "chat_template.jinja").write_text("file:{{ messages | length }}")
    assert ChatTemplate.from_dir(tmp_path).render(MESSAGES) == "file:5"
    (tmp_path / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "dflt"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    assert ChatTemplate.from_dir(tmp_path) is None


def test_template_errors_name_the_problem():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        ChatTemplate(TEMPLATE, SPECIALS).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute tricks
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


@pytest.mark.reference
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "fee"}}]])
def test_renders_like_transformers(tmp_path, add_generation_prompt, tools):
    transformers = pytest.importorskip(
        "transformers", reason="needs the reference extra: pip install -e .[reference]"
    )
    tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tok.chat_template = TEMPLATE
    tok.bos_token, tok.eos_token = SPECIALS["bos_token"], SPECIALS["eos_token"]
    ours = ChatTemplate(TEMPLATE, SPECIALS).render(
        MESSAGES, add_generation_prompt=add_generation_prompt, tools=tools
    )
    theirs = tok.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    # And the default model's own template, read from its directory by both.
    default = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    conversation = [m for m in MESSAGES if m["content"] != "skipped"]
    assert ChatTemplate.from_dir(DEFAULT_MODEL).render(
        conversation, add_generation_prompt=add_generation_prompt
    ) == default.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
