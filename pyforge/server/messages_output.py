"""The /v1/messages reply: a chat reply (chat.ChatReply) as Anthropic `message` objects.

Whole: the assistant message becomes content blocks, a `thinking` block (with a
--reasoning-parser), a `text` block (unless the text is blank), a `tool_use` block per
tool call. Streamed: the chat deltas become Anthropic's named events:

  message_start (the message, content [], stop_reason null), ping
  per block: content_block_start, content_block_delta (thinking_delta | text_delta |
             input_json_delta) ..., content_block_stop
  message_delta (stop_reason, stop_sequence, usage), message_stop

A text block opens at its first text that is not blank (a tool-calling model's line
breaks between calls make none), as the whole reply's does; keep-alives are pings.
"""
import json
import uuid

# finish_reason (after the chat reply's tool-call parsing) -> stop_reason
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessageFormat:
    """One request's Message object (generation.run's to_json) and event stream (its to_chunks)."""

    def __init__(self, ctx, reply):
        self.reply = reply
        self.keepalive = ctx.config.keepalive_interval
        self.id = "msg_" + uuid.uuid4().hex
        self.model = ctx.model_name

    def _message(self, content, stop_reason, stop_sequence, usage):
        return {"id": self.id, "type": "message", "role": "assistant", "content": content, "model": self.model,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def message(self, results, usage, gen):
        (text, _, finish_reason), = results
        message, reason = self.reply.message(text, finish_reason)
        content = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
        if (message["content"] or "").strip():
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls", ()):
            function = call["function"]
            content.append({"type": "tool_use", "id": _tool_use_id(call["id"]), "name": function["name"],
                            "input": json.loads(function["arguments"])})
        return self._message(content, *_stop(reason, gen), _usage(usage))

    def events(self, gen):
        prompt_tokens = sum(len(p.ids) for p in gen.request.prompts)
        yield {"type": "message_start", "message": self._message(
            [], None, None, {"input_tokens": prompt_tokens, "output_tokens": 0,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})}
        yield {"type": "ping"}
        stream, blocks, reason = self.reply.stream(), _Blocks(), None
        for u in gen.updates(self.keepalive):
            if u is None:
                yield {"type": "ping"}
                continue
            yield from blocks.feed(stream.feed(u.text))
            if u.finish_reason is not None:
                last, reason = stream.finish(u.finish_reason)
                yield from blocks.feed(last)
        yield from blocks.close()
        stop_reason, stop_sequence = _stop(reason, gen)
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": _usage(gen.usage())}
        yield {"type": "message_stop"}


class _Blocks:
    """Chat deltas -> content block events: a block opens at its first piece (text at its
    first text that is not blank) and closes when a block of another kind, or the end, comes."""

    def __init__(self):
        self.index, self.kind = -1, None
        self.blank = ""             # blank text held back until text that is not blank comes

    def feed(self, delta):
        if delta.get("reasoning_content"):
            yield from self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        text = delta.get("content")
        if text:
            if self.kind != "text" and not (self.blank + text).strip():
                self.blank += text
            else:
                yield from self._open("text", {"type": "text", "text": ""})
                yield self._delta({"type": "text_delta", "text": self.blank + text})
                self.blank = ""
        for call in delta.get("tool_calls", ()):
            if call.get("id") is not None:
                self.blank = ""
                yield from self._open("tool_use", {"type": "tool_use", "id": _tool_use_id(call["id"]),
                                                   "name": call["function"]["name"], "input": {}}, new=True)
            if call["function"]["arguments"]:
                yield self._delta({"type": "input_json_delta", "partial_json": call["function"]["arguments"]})

    def close(self):
        if self.kind is not None:
            yield {"type": "content_block_stop", "index": self.index}
            self.kind = None

    def _open(self, kind, block, new=False):
        """Open `block` unless a block of `kind` is open and `new` is false (each tool call is a block)."""
        if self.kind == kind and not new:
            return
        yield from self.close()
        self.index += 1
        self.kind = kind
        yield {"type": "content_block_start", "index": self.index, "content_block": block}

    def _delta(self, delta):
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def _stop(reason, gen):
    """(stop_reason, stop_sequence) of the chat finish_reason and the choice's stop string."""
    stop = gen.choices[0].stop
    if reason == "stop" and stop is not None:
        return "stop_sequence", stop
    return STOP_REASONS.get(reason, "end_turn"), None


def _usage(usage):
    """Chat usage in Anthropic's terms: input_tokens are the prompt tokens not read from the cache."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_use_id(call_id):
    return "toolu_" + call_id.removeprefix("call_")
