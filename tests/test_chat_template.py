"""chat_template.render's continue_final_message, against transformers on real templates."""
import json

import pytest

from conftest import SHARED, require_module
from pyforge.builtin_templates import NAMED_TEMPLATES
from pyforge.chat_template import ChatTemplateError, compile_template, render

TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
OLLAMA = json.loads((SHARED / "models" / "ollama-chat-templates" / "index.json").read_text())
TEMPLATES = [pytest.param(e["template"], id=f"{i}-{e['name']}") for i, e in enumerate(OLLAMA)] + \
    [pytest.param(t, id=name) for name, t in NAMED_TEMPLATES.items()]


def continued(template, messages):
    return render(compile_template(template), messages, add_generation_prompt=False, continue_final_message=True,
                  **TOKENS)


@pytest.mark.parametrize("template", TEMPLATES)
def test_continuation_matches_transformers(template):
    utils = require_module("transformers.utils.chat_template_utils")
    # trailing spaces and newlines: kept where the template keeps them, dropped where it trims
    for last in ("The answer is", "The answer is ", " x\n"):
        messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": last}]
        try:
            (expected,), _ = utils.render_jinja_template([messages], chat_template=template,
                                                         continue_final_message=True, **TOKENS)
        except Exception:       # the template refuses the chat (roles) or drops the message
            with pytest.raises(ChatTemplateError):
                continued(template, messages)
            continue
        assert continued(template, messages) == expected


def test_continuation_ends_inside_the_message():
    zephyr = NAMED_TEMPLATES["zephyr"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    whole = render(compile_template(zephyr), messages, add_generation_prompt=False, **TOKENS)
    assert whole.endswith("<|assistant|>\nThe answer is</s>\n")
    assert continued(zephyr, messages) == whole[:-len("</s>\n")]
    assert messages[-1]["content"] == "The answer is"       # the caller's messages are left alone


def test_an_empty_final_message_continues_from_its_opener():
    """transformers strips the template's own whitespace here; an empty message keeps its opener whole."""
    llama3 = NAMED_TEMPLATES["llama3"]
    user = [{"role": "user", "content": "Hi"}]
    opened = render(compile_template(llama3), user, add_generation_prompt=True, **TOKENS)
    assert opened.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert continued(llama3, [*user, {"role": "assistant", "content": ""}]) == opened


def test_continuation_errors():
    template = compile_template(NAMED_TEMPLATES["chatml"])
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatTemplateError, match="exclude each other"):
        render(template, messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="text content"):
        render(template, [{"role": "user", "content": None}], add_generation_prompt=False,
               continue_final_message=True)
    drops_last = compile_template("{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not render the final message"):
        render(drops_last, messages, add_generation_prompt=False, continue_final_message=True)
