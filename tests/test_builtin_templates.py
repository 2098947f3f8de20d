"""--chat-template NAME: the built-in templates are the model makers' own, byte for byte."""
import json

import pytest

from conftest import SHARED, require_module
from pyforge.builtin_templates import NAMED_TEMPLATES
from pyforge.chat_template import CHATML_TEMPLATE, compile_template, render
from pyforge.config import ServerConfig

MODELS = SHARED / "models"
OLLAMA = json.loads((MODELS / "ollama-chat-templates" / "index.json").read_text())
# name -> where its source lives: (an ollama index family, or a tokenizer_config.json)
SOURCES = {"llama2": "llama2-chat", "llama3": "llama3-instruct", "mistral": "mistral-instruct",
           "gemma": "gemma-instruct", "zephyr": MODELS / "TinyLlama-1.1B-Chat-v1.0" / "tokenizer_config.json",
           "phi3": MODELS / "Phi-3-mini-tokenizer" / "tokenizer_config.json"}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
CHAT = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "2+2?"}]


def test_every_name_has_its_source():
    assert set(NAMED_TEMPLATES) == {"chatml", *SOURCES}
    assert NAMED_TEMPLATES["chatml"] is CHATML_TEMPLATE


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_template_is_its_source(name):
    source = SOURCES[name]
    if isinstance(source, str):
        assert any(e["name"] == source and e["template"] == NAMED_TEMPLATES[name] for e in OLLAMA)
    else:
        assert json.loads(source.read_text())["chat_template"] == NAMED_TEMPLATES[name]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_template_renders_as_transformers_does(name):
    utils = require_module("transformers.utils.chat_template_utils")
    template = NAMED_TEMPLATES[name]
    for add_generation_prompt in (True, False):
        (expected,), _ = utils.render_jinja_template([CHAT], chat_template=template,
                                                     add_generation_prompt=add_generation_prompt, **TOKENS)
        ours = render(compile_template(template), CHAT, add_generation_prompt=add_generation_prompt, **TOKENS)
        assert ours == expected and "2+2?" in ours


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_chat_template_flag_takes_every_name(name):
    assert ServerConfig(model="m", chat_template=name).load_chat_template() == NAMED_TEMPLATES[name]
