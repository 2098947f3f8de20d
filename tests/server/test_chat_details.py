"""Chat details: text parts, add_generation_prompt, continue_final_message, chat_template_kwargs,
the ChatML fallback for a model without a template. In-process app over a real engine; the
tiny-gqa model carries TinyLlama's (Zephyr) template, stories260K none."""
import logging

import pytest

from conftest import STORIES, inprocess_app
from pyforge.chat_template import CHATML_TEMPLATE, compile_template, render
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server import validation as v

GREEDY = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
CONTINUED = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital is"}]
# a template that shows a template variable: enable_thinking false writes an empty think block
THINKING_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:"
                     "{% if enable_thinking is defined and not enable_thinking %} <think></think>{% endif %}"
                     "{% endif %}")


@pytest.fixture(scope="module")
def tiny(model_path):
    with inprocess_app(model_path) as served:
        yield served


@pytest.fixture(scope="module")
def thinking(model_path):
    with inprocess_app(model_path, chat_template=THINKING_TEMPLATE) as served:
        yield served


IDLE_AFTER_EACH_TEST = ("tiny", "thinking")     # conftest.engines_idle_after


def chat(app, path="/v1/chat/completions", **body):
    return app.simulate_post(path, json={**GREEDY, **body})


def tokenized(app, **body):
    r = app.simulate_post("/tokenize", json=body)
    assert r.status_code == 200, r.json
    return r.json["tokens"]


# -- content parts ------------------------------------------------------------------

def test_text_parts_are_joined_with_a_newline(tiny):
    app, _ = tiny
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    assert v.check_messages([{"role": "user", "content": parts}])[0]["content"] == "What is\nthe best book"
    as_parts = chat(app, messages=[{"role": "user", "content": parts}]).json
    as_text = chat(app, messages=[{"role": "user", "content": "What is\nthe best book"}]).json
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]
    assert as_parts["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"]
    assert tokenized(app, messages=[{"role": "user", "content": parts}]) != \
        tokenized(app, messages=[{"role": "user", "content": "What isthe best book"}])


# -- the template's switches --------------------------------------------------------

def test_continue_final_message_continues_the_assistant_text(tiny, model_path):
    app, engine = tiny
    tok = engine.tokenizer
    text = tok.apply_chat_template(CONTINUED, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|assistant|>\nThe capital is")          # no </s>: the turn is still open
    ids = tok.encode(text)
    reference = Engine(model_path, n_threads=1, max_model_len=512, kv_cache_tokens=2048)
    generated = [o.token_id for o in reference.generate(ids, SamplingParams(temperature=0, max_tokens=5,
                                                                           ignore_eos=True))]
    body = chat(app, messages=CONTINUED, continue_final_message=True, add_generation_prompt=False).json
    assert body["usage"]["prompt_tokens"] == len(ids)
    # the reply is the continuation alone, as if the prompt's text went on
    assert body["choices"][0]["message"]["content"] == tok.decode(ids + generated)[len(tok.decode(ids)):]
    # add_generation_prompt defaults to false when continuing; the /api chat route takes the same switches
    again = chat(app, messages=CONTINUED, continue_final_message=True).json
    assert again["choices"] == body["choices"] and again["usage"]["prompt_tokens"] == len(ids)
    api = chat(app, "/api/chat", messages=CONTINUED, continue_final_message=True).json
    assert api["message"]["content"] == body["choices"][0]["message"]["content"]


def test_add_generation_prompt_false_is_honoured(tiny):
    app, engine = tiny
    tok = engine.tokenizer
    messages = CONTINUED[:1]
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>")
    for path in ("/v1/chat/completions", "/api/chat"):
        off = chat(app, path, messages=messages, add_generation_prompt=False).json["usage"]
        on = chat(app, path, messages=messages, add_generation_prompt=True).json["usage"]
        assert off["prompt_tokens"] == len(tok.encode(without))
        assert on["prompt_tokens"] == len(tok.encode(tok.apply_chat_template(messages))) > off["prompt_tokens"]


def test_chat_template_kwargs_reach_the_template(thinking):
    app, engine = thinking
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenized(app, messages=messages, chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(off, skip_special_tokens=False).endswith("assistant: <think></think>")
    assert tok.decode(tokenized(app, messages=messages), skip_special_tokens=False).endswith("assistant:")
    body = chat(app, messages=messages, chat_template_kwargs={"enable_thinking": False}).json
    assert body["usage"]["prompt_tokens"] == len(off)


@pytest.mark.parametrize("fields, param", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"continue_final_message": "yes"}, "continue_final_message"),
    ({"add_generation_prompt": 1}, "add_generation_prompt"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
])
def test_bad_template_switches_are_400s(tiny, fields, param):
    app, _ = tiny
    for path in ("/v1/chat/completions", "/api/chat", "/tokenize"):
        r = chat(app, path, messages=CONTINUED, **fields)
        assert r.status_code == 400 and r.json["error"]["param"] == param, (path, r.json)


def test_a_template_that_drops_the_final_message_cannot_continue_it(model_path):
    template = "{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}"
    with inprocess_app(model_path, chat_template=template) as (app, _):
        r = chat(app, messages=CONTINUED, continue_final_message=True)
    assert r.status_code == 400 and r.json["error"]["param"] == "messages"
    assert "final message" in r.json["error"]["message"]


# -- a model without a template -----------------------------------------------------

def test_a_model_without_a_template_gets_chatml_and_a_log_line(caplog):
    messages = [{"role": "user", "content": "Tell me a story"}]
    with caplog.at_level(logging.WARNING, logger="pyforge.server.app"):
        with inprocess_app(STORIES) as (app, engine):
            body = chat(app, messages=messages).json
            streamed = app.simulate_post("/v1/chat/completions", json={**GREEDY, "messages": messages,
                                                                       "stream": True})
    assert any("stories260K has no chat template" in r.getMessage() and "ChatML" in r.getMessage()
               for r in caplog.records)
    text = render(compile_template(CHATML_TEMPLATE), messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n"
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(text))
    assert body["choices"][0]["message"]["content"] and streamed.status_code == 200
