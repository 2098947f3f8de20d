"""Chat templates: Hugging Face-style Jinja2 rendering in a sandbox.

Templates come from model files, so they are untrusted code: they run in
`ImmutableSandboxedEnvironment` with the globals HF provides (`raise_exception`,
`strftime_now`, a non-escaping `tojson`, loop controls, `{% generation %}`).
Every failure, including a sandbox violation, surfaces as `ChatTemplateError`.
"""
import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import CallBlock
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# For models without a template: `--chat-template chatml`, and the server's logged fallback.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CONTINUE = "<|pyforge:continue-here|> "   # marks where a continued final message's text ends


class ChatTemplateError(ValueError):
    """The chat template is missing, malformed, unsafe, or rejected the messages."""


class _LoudUndefined(jinja2.Undefined):
    """The sandbox answers a blocked attribute (`''.__class__`) with an Undefined that
    prints as ''; make it raise instead, so an escape attempt is reported, not hidden."""
    __slots__ = ()

    def __str__(self):
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return super().__str__()

    def __bool__(self):
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return super().__bool__()


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text; render it as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and '; HF's does not, and templates expect HF's.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source):
    """Compile `source` in a fresh sandboxed environment; ChatTemplateError on bad syntax."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=_LoudUndefined,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def render(template, messages, *, add_generation_prompt, continue_final_message=False, **context):
    """Render a compiled template the way HF's `apply_chat_template` does.

    `continue_final_message`: the text ends inside the last message (its end-of-turn and
    whatever follows it left out), so a model continues that message. As transformers
    does it: the message is rendered with a marker after its text and the text cut at
    the marker, so an empty message works too; where the template trims the message
    (the marker's trailing space is gone), so does the message's trailing whitespace
    (transformers strips the text's: with an empty message, the template's own too)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts")
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other")
        if not messages or not isinstance(messages[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message needs a final message with text content")
        content = messages[-1]["content"]
        messages = [*messages[:-1], {**messages[-1], "content": content + _CONTINUE}]
    text = _render(template, messages, add_generation_prompt, context)
    if not continue_final_message:
        return text
    end = text.rfind(_CONTINUE.strip())
    if end < 0:
        raise ChatTemplateError("the chat template does not render the final message: it cannot be continued")
    kept, tail = text[:end].replace(_CONTINUE.strip(), ""), content[len(content.rstrip()):]
    trimmed = not text.startswith(_CONTINUE, end)
    return kept[:len(kept) - len(tail)] if trimmed and tail and kept.endswith(tail) else kept


def _render(template, messages, add_generation_prompt, context):
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from e
    except Exception as e:   # untrusted code: any failure is the template's (or the messages')
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
