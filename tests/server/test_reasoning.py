"""Reasoning blocks: whole outputs and streams split alike at every chunk boundary, and
a constraint wrapped to start after `</think>` lets the reasoning run free."""
import json

import pytest

from conftest import SHARED
from pyforge.server.reasoning import Thinking
from pyforge.structured import _Vocabulary, grammar_for, llg_tokenizer
from pyforge.tokenizer import Tokenizer

QWEN3_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
R1_PROMPT = "<｜User｜>Hi<｜Assistant｜><think>\n"
NO_THINK_PROMPT = QWEN3_PROMPT + "<think>\n\n</think>\n\n"

CASES = [   # (prompt, output, reasoning, content)
    (QWEN3_PROMPT, "<think>\nLet me see.\n</think>\n\nHello!", "\nLet me see.\n", "Hello!"),
    (QWEN3_PROMPT, "Hello without thinking </think> tag later", None, "Hello without thinking </think> tag later"),
    (QWEN3_PROMPT, "<think>cut short", "cut short", ""),
    (R1_PROMPT, "Hmm, 2+2.</think>The answer is 4.", "Hmm, 2+2.", "The answer is 4."),
    (R1_PROMPT, "still thinking <thi", "still thinking <thi", ""),
    (NO_THINK_PROMPT, "Plain answer </think> here", None, "Plain answer </think> here"),
    (QWEN3_PROMPT, "<think></think>   {\"a\": 1}", "", "{\"a\": 1}"),
]


@pytest.mark.parametrize("prompt, output, reasoning, content", CASES)
def test_whole_and_streamed_outputs_split_alike(prompt, output, reasoning, content):
    thinking = Thinking(prompt)
    assert thinking.split(output) == (reasoning, content)
    for cuts in [[i] for i in range(len(output) + 1)] + [list(range(len(output) + 1))]:
        stream, pieces, last = thinking.stream(), [], 0
        for cut in cuts + [len(output)]:
            pieces += stream.feed(output[last:cut])
            last = cut
        pieces += stream.finish()
        got_reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        got_content = "".join(t for kind, t in pieces if kind == "content")
        assert (got_reasoning if reasoning is not None else None, got_content) == (reasoning, content), cuts


@pytest.fixture(scope="module")
def vocabulary():
    tk = Tokenizer.from_hf_folder(SHARED / "models" / "TinyLlama-1.1B-Chat-v1.0")
    return tk, llg_tokenizer(tk)


def test_a_wrapped_constraint_applies_after_the_reasoning_block(vocabulary):
    llguidance = pytest.importorskip("llguidance")
    tk, llg = vocabulary
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    grammar = Thinking(QWEN3_PROMPT).wrap_grammar(grammar_for("json_schema", schema), lambda text: None)
    assert llguidance.LLMatcher.validate_grammar(grammar, llg) == ""
    encode = _Vocabulary(tk)

    def accepts(text):
        m = llguidance.LLMatcher(llg, grammar, log_level=0)
        return m.consume_tokens(encode(text)) and m.is_accepting()
    assert accepts('<think>\nAny {free} "text" at all.\n</think>\n\n{"n": 42}')
    assert not accepts('<think>\nthinking</think>\n\nnot json')
    assert not accepts('{"n": 42}')                 # the block must close first
    # a template that closed an empty block leaves the grammar as it was
    plain = grammar_for("json_schema", schema)
    assert Thinking(NO_THINK_PROMPT).wrap_grammar(plain, lambda text: None) == plain
    assert json.loads(Thinking(R1_PROMPT).wrap_grammar(plain, lambda text: 7))["grammars"][0]["lark_grammar"] \
        .endswith("think: /(?s:.*)/ <[7]>\nWS: /[ \\t\\r\\n]+/\n")
