"""Reasoning models: the `<think>…</think>` block of Qwen3, QwQ and the DeepSeek-R1
distills goes to `message.reasoning_content` (streamed as `delta.reasoning_content`),
the rest to `content`; an output constraint applies after the block.

`--reasoning-parser` names the format (vLLM's names: deepseek_r1, qwen3; both write
`<think>…</think>`). Where the chat template already opened the block (R1 distills
end the generation prompt with `<think>\\n`), the output starts inside it; where the
template closed an empty one (Qwen3 with enable_thinking false), there is none.
"""
import json
import re

OPEN, CLOSE = "<think>", "</think>"
_CLOSED_AT_END = re.compile(r"</think>\s*$")


class Thinking:
    """How one request's output begins: `expected` is whether a reasoning block may
    come at all, `inside` whether the prompt left the output inside one."""

    def __init__(self, prompt_text):
        self.expected = not _CLOSED_AT_END.search(prompt_text)
        self.inside = self.expected and prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)

    def split(self, text):
        """(reasoning or None, content) of a whole output; ThinkingStream's pieces
        joined give the same."""
        if not self.expected or not (self.inside or text.startswith(OPEN)):
            return None, text
        body = text if self.inside else text[len(OPEN):]
        end = body.find(CLOSE)
        if end < 0:                     # cut short while still thinking
            return body, ""
        return body[:end], body[end + len(CLOSE):].lstrip()

    def stream(self):
        return ThinkingStream(self)

    def wrap_grammar(self, grammar, special_ids):
        """`grammar` (llguidance's JSON form) applied after a free reasoning block;
        `special_ids(text)` is the id of an added special token, or None."""
        if not self.expected:
            return grammar
        top = json.loads(grammar)
        inner = top["grammars"]
        inner[0] = {**inner[0], "name": "answer"}
        close_id = special_ids(CLOSE)
        if close_id is None:    # text: lazy, so the block ends at the first </think>
            think = "think[lazy]: /(?s:.*)<\\/think>/"
        else:                   # a special token is never text: any text, then the token
            think = f"think: /(?s:.*)/ <[{close_id}]>"
        lark = f"start: think WS? @answer\n{think}\nWS: /[ \\t\\r\\n]+/\n"
        return json.dumps({**top, "grammars": [{"lark_grammar": lark}, *inner]})


class ThinkingStream:
    """Splits streamed text into ("reasoning" | "content", text) pieces as it comes,
    holding back a tail that could still begin `</think>`."""

    def __init__(self, thinking):
        self.expected = thinking.expected
        self.in_reasoning = thinking.inside
        self.pending = ""
        self.started = thinking.inside     # the block has begun (or the output began in it)
        self.after_close = False           # strip the whitespace that follows </think>

    def feed(self, text):
        self.pending += text
        out = []
        while self.pending:
            if not self.expected or not (self.in_reasoning or self._may_open()):
                out.append(self._content(self.pending))
                self.pending = ""
                break
            if not self.in_reasoning:
                if len(self.pending) < len(OPEN) and OPEN.startswith(self.pending):
                    break                   # could still be <think>
                if not self.pending.startswith(OPEN):
                    self.expected = False   # answered without thinking
                    continue
                self.in_reasoning = self.started = True
                self.pending = self.pending[len(OPEN):]
                continue
            end = self.pending.find(CLOSE)
            if end >= 0:
                out.append(("reasoning", self.pending[:end]))
                self.pending = self.pending[end + len(CLOSE):]
                self.in_reasoning, self.expected, self.after_close = False, False, True
                continue
            keep = _partial_tail(self.pending, CLOSE)
            out.append(("reasoning", self.pending[:len(self.pending) - keep]))
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return [(kind, text) for kind, text in out if text]

    def finish(self):
        rest, self.pending = self.pending, ""
        kind = "reasoning" if self.in_reasoning else "content"
        return [(kind, rest)] if rest else []

    def _may_open(self):
        """Before anything was said, a reasoning block may still open."""
        return not self.started and self.expected

    def _content(self, text):
        if self.after_close:
            text = text.lstrip()
            self.after_close = not text
        return "content", text


def _partial_tail(text, tag):
    """Length of the longest tail of `text` that begins `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
