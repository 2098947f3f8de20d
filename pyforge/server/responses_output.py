"""The /v1/responses reply: a chat reply (chat.ChatReply) as OpenAI `response` objects.

Whole: the assistant message becomes output items — a `reasoning` item (with a
--reasoning-parser), a `message` item with one `output_text` part, a `function_call`
item per tool call. Streamed: the chat deltas become the Responses events, each with
`type` and `sequence_number`:

  response.created, response.in_progress
  per item:  response.output_item.added
             (message, reasoning)  response.content_part.added, response.output_text.delta |
                                   response.reasoning_text.delta ..., *.done, response.content_part.done
             (function_call)       response.function_call_arguments.delta ..., .done
             response.output_item.done
  response.completed | response.incomplete (max_output_tokens reached) |
  response.failed, then error (the engine failed: the status and message)

A message item opens at its first text that is not blank (a tool-calling model's line
breaks between calls make none; with tools, a message's text is stripped as the whole
reply's is); an output without text or calls is one empty message, as the whole reply's is.
"""
import itertools
import time
import uuid

from pyforge.server.errors import error_body
from pyforge.server.generation import GenerationError


def new_id(prefix):
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One request's response objects: `whole(results, usage)` (generation.run's to_json)
    and `events(gen)` (its to_chunks). `echo`: the request settings the object repeats."""

    def __init__(self, ctx, reply, echo):
        self.tok = ctx.tokenizer
        self.keepalive = ctx.config.keepalive_interval
        self.reply = reply
        self.echo = echo
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.model = ctx.model_name
        self.seq = itertools.count()    # a stream's sequence numbers

    def response(self, status, output, usage=None, error=None):
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, "model": self.model, "output": output,
                "usage": usage, **self.echo}
        if status == "completed":
            body["completed_at"] = int(time.time())
        return body

    def whole(self, results, usage):
        (text, _, finish_reason), = results
        status, output, reasoning = output_items(self.reply, text, finish_reason)
        return self.response(status, output, self._usage(usage, reasoning))

    def events(self, gen):
        def event(kind, **fields):
            return {"type": kind, "sequence_number": next(self.seq), **fields}

        yield event("response.created", response=self.response("in_progress", []))
        yield event("response.in_progress", response=self.response("in_progress", []))
        items = StreamedItems(self.reply.stream())
        try:
            for u in gen.updates(self.keepalive):
                if u is None:
                    yield None
                    continue
                for kind, fields in items.feed(u.text, u.finish_reason):
                    yield event(kind, **fields)
        except GenerationError as e:    # then error_event ends the stream
            error = {"code": error_body(e.status, str(e))["error"]["type"], "message": str(e)}
            yield event("response.failed", response=self.response("failed", items.output(), error=error))
            raise
        status = "incomplete" if items.reason == "length" else "completed"
        yield event(f"response.{status}", response=self.response(
            status, items.output(), self._usage(gen.usage(), items.reasoning())))

    def error_event(self, status, message):
        """The `error` event that ends a failed stream (generation.run's stream_error)."""
        return {"type": "error", "sequence_number": next(self.seq),
                "code": error_body(status, message)["error"]["type"], "message": message, "param": None}

    def _usage(self, usage, reasoning):
        """Chat usage in the Responses names; reasoning tokens counted by re-encoding the reasoning text."""
        return {"input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": len(self.tok.encode(reasoning, add_bos=False))
                                          if reasoning else 0},
                "total_tokens": usage["total_tokens"]}


def output_items(reply, text, finish_reason):
    """(status, output items, reasoning text or None) of a whole output; the last item is
    incomplete when max_output_tokens cut it."""
    message, reason = reply.message(text, finish_reason)
    reasoning, calls = message.get("reasoning_content"), message.get("tool_calls", [])
    output = []
    if reasoning:
        output.append(item("reasoning", new_id("rs"), "completed", reasoning))
    if message["content"] or not calls:
        output.append(item("message", new_id("msg"), "completed", message["content"] or ""))
    output += [item("function_call", new_id("fc"), "completed", c["function"]["arguments"],
                    (c["id"], c["function"]["name"])) for c in calls]
    status = "incomplete" if reason == "length" else "completed"
    output[-1]["status"] = status
    return status, output, reasoning


def item(kind, item_id, status, text, call=None):
    """An output item of `kind` (message | reasoning | function_call); `text` None: as just
    added, before any content. `call`: (call_id, name) of a function call."""
    if kind == "function_call":
        call_id, name = call
        return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
                "arguments": text or ""}
    parts = [] if text is None else [part(kind, text)]
    if kind == "message":
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}
    return {"id": item_id, "type": "reasoning", "summary": [], "content": parts, "status": status}


def part(kind, text):
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}


# item kind -> (id prefix, the prefix of its delta / done event types)
_KINDS = {"message": ("msg", "response.output_text"), "reasoning": ("rs", "response.reasoning_text"),
          "function_call": ("fc", "response.function_call_arguments")}


class _Item:
    def __init__(self, kind, index, call=None):
        self.kind, self.index, self.call = kind, index, call
        self.id = new_id(_KINDS[kind][0])
        self.text = ""
        self.status = "in_progress"

    def where(self):
        at = {"item_id": self.id, "output_index": self.index}
        return at if self.kind == "function_call" else {**at, "content_index": 0}

    def whole(self):
        return item(self.kind, self.id, self.status, self.text, self.call)


class StreamedItems:
    """A ChatStream's deltas -> output items and their events, as (type, fields) pairs."""

    def __init__(self, chat_stream):
        self.chat = chat_stream
        self.items = []
        self.current = None     # the item text goes to now
        self.calls = {}         # tool call index -> its item
        self.held = ""          # blank text not yet worth a message item
        self.reason = None

    def output(self):
        return [i.whole() for i in self.items]

    def reasoning(self):
        return "".join(i.text for i in self.items if i.kind == "reasoning")

    def feed(self, text, finish_reason=None):
        events = self._delta(self.chat.feed(text))
        if finish_reason is not None:
            last, self.reason = self.chat.finish(finish_reason)
            events += self._delta(last)
            held, self.held = ("" if self.chat.tools is not None else self.held), ""
            if not any(i.kind != "reasoning" for i in self.items):
                events += self._open("message") + self._append(held)
            if self.current is not None:
                events += self._close(self.current, "incomplete" if self.reason == "length" else "completed")
        return events

    def _delta(self, delta):
        events = []
        if delta.get("reasoning_content"):
            if self.current is None or self.current.kind != "reasoning":
                events += self._open("reasoning")
            events += self._append(delta["reasoning_content"])
        if delta.get("content"):
            events += self._content(delta["content"])
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                events += self._open("function_call", (piece["id"], piece["function"]["name"]))
                self.calls[piece["index"]] = self.current
            events += self._append(piece["function"]["arguments"], self.calls[piece["index"]])
        return events

    def _content(self, text):
        """Blank text opens no message item (held until text follows). With tools, the whole
        reply's text is stripped: blanks at either end of a message are never sent."""
        in_message = self.current is not None and self.current.kind == "message"
        tools = self.chat.tools is not None
        if in_message and not tools:
            return self._append(text)
        self.held += text
        if not self.held.strip():
            return []
        text, self.held = self.held, ""
        if tools:
            text = text if in_message else text.lstrip()
            body = text.rstrip()
            text, self.held = body, text[len(body):]
        return ([] if in_message else self._open("message")) + self._append(text)

    def _open(self, kind, call=None):
        events = self._close(self.current, "completed") if self.current is not None else []
        self.current = new = _Item(kind, len(self.items), call)
        self.items.append(new)
        events.append(("response.output_item.added", {"output_index": new.index,
                                                      "item": item(kind, new.id, "in_progress", None, call)}))
        if kind != "function_call":
            events.append(("response.content_part.added", {**new.where(), "part": part(kind, "")}))
        return events

    def _append(self, text, to=None):
        to = to or self.current
        if not text:
            return []
        to.text += text
        fields = {**to.where(), "delta": text}
        if to.kind == "message":
            fields["logprobs"] = []
        return [(_KINDS[to.kind][1] + ".delta", fields)]

    def _close(self, it, status):
        it.status = status
        self.current = None if it is self.current else self.current
        if it.kind == "function_call":
            events = [(_KINDS[it.kind][1] + ".done", {**it.where(), "arguments": it.text})]
        else:
            done = {**it.where(), "text": it.text}
            if it.kind == "message":
                done["logprobs"] = []
            events = [(_KINDS[it.kind][1] + ".done", done),
                      ("response.content_part.done", {**it.where(), "part": part(it.kind, it.text)})]
        return events + [("response.output_item.done", {"output_index": it.index, "item": it.whole()})]
