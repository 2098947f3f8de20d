"""One request table behind every engine loop (the engine process's and the
in-process client's): request id <-> sequence <-> whoever waits for the reply;
admission, aborts, the step and what a failed step ends.

The loops differ only in their transport, which the table calls through a
`Replies` object:

    admitted(entry)                    the engine queued it
    prompt_logprobs(entry, entries)    PromptLogprobs of prompt tokens (engine/prompt_logprobs.py),
                                       before the step's tokens; only to requests that asked
    tokens(entry, output)              one StepOutput of this step
    embedding(entry, vector)           an embedding request's result (engine/pooling.py), then
                                       finished(entry, "stop"); it gets no tokens
    finished(entry, reason)            the last record: "stop" | "length" | "abort"
    failed(entry, kind, message)       the last record: an error (an ErrorKind)
    plain_batches                      optional: None, or where the step core writes a plain step's
                                       records itself (step_core.publish_plain: the ring
                                       transport's per-slot messages); requests that asked
                                       for logprobs still get tokens() / finished()

Each entry is answered with exactly one of finished / failed (a refused
admission gets failed alone); after that the table has forgotten it.
"""
import logging
from dataclasses import dataclass

from pyforge.engine.engine import PlainOutputs, StepError
from pyforge.engine.errors import INTERNAL_ERROR, ErrorKind
from pyforge.native import step_core

log = logging.getLogger(__name__)


@dataclass
class Entry:
    request_id: int
    owner: object               # the transport's: a worker slot (and its pid), or a RequestStream
    want_logprobs: bool = False
    seq: object = None          # the engine's Sequence once admitted
    started: bool = False       # it has had a token
    prompt_sent: int = 0        # prompt logprobs already replied


class RequestTable:
    def __init__(self, engine, replies):
        self.engine = engine
        self.replies = replies
        self.entries = {}           # request id -> Entry
        self._by_seq = {}           # seq id -> Entry
        self.started_prompt_tokens = 0  # prompt tokens of the requests that had a token (a counter)

    def __len__(self):
        return len(self.entries)

    def admit(self, request_id, owner, prompt_ids, params):
        """Queue a request in the engine; the Entry, or None if it was refused (400)."""
        entry = Entry(request_id, owner, params.logprobs is not None)
        if request_id in self.entries:
            self.replies.failed(entry, ErrorKind.BAD_REQUEST, "duplicate request id")
            return None
        try:
            entry.seq = self.engine.add_request(prompt_ids, params)
        except (TypeError, ValueError) as e:
            self.replies.failed(entry, ErrorKind.BAD_REQUEST, str(e))
            return None
        self.entries[request_id] = entry
        self._by_seq[entry.seq.seq_id] = entry
        self.replies.admitted(entry)
        return entry

    def abort(self, request_id):
        """Stop a request at its client's wish: it finishes with reason "abort"."""
        entry = self.entries.get(request_id)
        if entry is not None:
            self.drop(entry)
            self.replies.finished(entry, "abort")

    def drop(self, entry):
        """End a request without a reply (nobody is left to read one)."""
        self.engine.abort(entry.seq.seq_id)
        self._forget(entry)

    def step(self):
        """One engine step; every output goes to its entry's replies. A failed step
        ends only the requests it names (OUT_OF_MEMORY, else INTERNAL); a bug in the
        step ends every request (INTERNAL). Returns the number of outputs."""
        try:
            outputs = self.engine.step()
        except StepError as e:
            log.error("engine step failed: %s", e, exc_info=e.__cause__)
            kind, message = e.reply()
            for entry in [self._by_seq[s] for s in e.seq_ids if s in self._by_seq]:
                self._forget(entry)
                self.replies.failed(entry, kind, message)
            outputs = e.outputs
        except Exception:
            log.exception("engine step failed")
            self.fail_all(ErrorKind.INTERNAL, INTERNAL_ERROR)
            return 0
        self._reply_prompt_logprobs()
        batches = getattr(self.replies, "plain_batches", None)
        if batches is not None and isinstance(outputs, PlainOutputs):
            self.started_prompt_tokens += step_core.publish_plain(
                outputs.seqs, outputs.tokens, outputs.statuses, self._by_seq, self.entries, batches,
                lambda entry, i: self._reply(entry, outputs.output(i)))
            return len(outputs)
        for out in outputs:
            entry = self._by_seq.get(out.seq_id)
            if entry is not None:
                if not entry.started:
                    entry.started = True
                    self.started_prompt_tokens += entry.seq.num_prompt_tokens
                self._reply(entry, out)
        return len(outputs)

    def _reply(self, entry, out):
        """An output's records (it has had its first token counted)."""
        if out.embedding is not None:
            self.replies.embedding(entry, out.embedding)
        else:
            self.replies.tokens(entry, out)
        if out.finished:
            self._forget(entry)
            self.replies.finished(entry, out.finish_reason)

    def _reply_prompt_logprobs(self):
        for seq in self.engine.prompt_logprobs_seqs:
            entry = self._by_seq.get(seq.seq_id)
            if entry is not None and len(seq.prompt_logprobs) > entry.prompt_sent:
                self.replies.prompt_logprobs(entry, seq.prompt_logprobs[entry.prompt_sent:])
                entry.prompt_sent = len(seq.prompt_logprobs)

    def fail_all(self, kind, message):
        for entry in list(self.entries.values()):
            self.drop(entry)
            self.replies.failed(entry, kind, message)

    def _forget(self, entry):
        self.entries.pop(entry.request_id, None)
        self._by_seq.pop(entry.seq.seq_id, None)
