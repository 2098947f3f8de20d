# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The engine step's per-sequence loops, compiled (issue 15).

DecodeBatch: the steady-state flattened batch (every sequence adds its newest
token), kept between steps and updated by diff, as vLLM's persistent batch:

    row_seq[cap]            int64  seq id in each row (-1: free)
    row_len[cap]            int32  block-table entries the row holds
    tables[cap, width]      int32  block tables (entries past row_len: 0)
    tokens, positions, slots, context_lens [cap]  int32  this step's per-row inputs

A sequence keeps its row while it decodes: each step writes its token,
position, slot and context length, and copies only the block-table entries it
gained. A sequence that leaves (finished, preempted, not scheduled) frees its
row and the last row moves into the hole; a newcomer takes the next free row.
Rows are therefore not in plan order: `build` returns, per row, the plan index
(the engine samples rows in that order; results do not depend on it, which is
batch invariance). A step that is not pure decode (prefill, drafts, prompt
logits) goes through ModelRunner's general path and calls `reset`.

append_tokens: the per-token bookkeeping of a plain step (no drafts, no
grammar): append each sampled token and check EOS / stop ids / max_tokens.
advance_computed: count the step's tokens as computed; say who filled a block.
schedule_running / schedule_waiting: the scheduler's loops over its running
sequences (preemption included) and its waiting queue (prefix reuse, admission,
the release of prefix claims when nothing runs), for the plain sequences; those
with drafts, prompt logprobs or pooling go to the Python loop, one at a time.
pack_sampling / store_rng_states: the sampler's per-row inputs and RNG states.
plan_kinds: which special cases (embeddings, prompt logprobs, drafts, grammars) a
plan holds, so the usual step skips their per-sequence scans.
publish_plain: a plain step's TOKENS and FINISH records, encoded straight into each
worker slot's response-ring message (the layout of native/pyforge_ipc.h).

The Sequence objects stay the owners of the state (Python reads them
everywhere); these loops read their attributes with C-level calls instead of
bytecode, which is where the Python step spent its time. Touching Python objects,
they hold the GIL: releasing it needs the state in C arrays first (issue 15's
remaining part).
"""
import numpy as np

from pyforge.engine.sequence import SequenceStatus

cimport numpy as cnp
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cnp.import_array()

cdef extern from "sampler_kernels.h":
    const float PF_GREEDY_TEMPERATURE     # temperatures below it sample greedily
    const uint64_t PF_RNG_GAMMA           # a draw's step of the RNG state

# SequenceStatus values (pyforge/engine/sequence.py), mirrored for the C loop
cdef int RUNNING = 1
cdef int FINISHED_STOPPED = 3
cdef int FINISHED_LENGTH = 4
_RUNNING_STATUS = SequenceStatus.RUNNING


cdef class DecodeBatch:
    cdef readonly int block_size
    cdef readonly Py_ssize_t n_rows, width
    cdef dict row_of                        # seq id -> row
    cdef object _row_seq, _row_len, _plan_index, _tables
    cdef object _tokens, _positions, _slots, _context_lens, _arange
    cdef int64_t[::1] row_seq
    cdef int32_t[::1] row_len, plan_index, tokens, positions, slots, context_lens
    cdef int32_t[:, ::1] tables

    def __init__(self, int block_size, Py_ssize_t capacity=16):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.width = 1
        self._allocate(max(capacity, 1))
        self.reset()

    def reset(self):
        """Forget every row (the next build rewrites them all)."""
        self.row_of = {}
        self.n_rows = 0

    cdef _allocate(self, Py_ssize_t capacity):
        """Grow the per-row arrays to `capacity` rows, keeping the rows held."""
        cdef Py_ssize_t old = self.n_rows if self.row_of is not None else 0
        self._row_seq = _grown(self._row_seq, old, np.int64, capacity)
        self._row_seq[old:] = -1
        self._row_len = _grown(self._row_len, old, np.int32, capacity)
        self._plan_index = _grown(self._plan_index, old, np.int32, capacity)
        self._tokens = _grown(self._tokens, old, np.int32, capacity)
        self._positions = _grown(self._positions, old, np.int32, capacity)
        self._slots = _grown(self._slots, old, np.int32, capacity)
        self._context_lens = _grown(self._context_lens, old, np.int32, capacity)
        self._tables = _grown(self._tables, old, np.int32, (capacity, self.width))
        self._arange = np.arange(capacity + 1, dtype=np.int32)
        self.row_seq, self.row_len, self.plan_index = self._row_seq, self._row_len, self._plan_index
        self.tokens, self.positions, self.slots = self._tokens, self._positions, self._slots
        self.context_lens, self.tables = self._context_lens, self._tables

    cdef _set_width(self, Py_ssize_t width):
        """Block tables exactly `width` wide (the longest row's), as the general path builds them."""
        new = np.zeros((self._tables.shape[0], width), dtype=np.int32)
        keep = min(width, self.width)
        new[:self.n_rows, :keep] = self._tables[:self.n_rows, :keep]
        self._tables, self.tables, self.width = new, new, width

    cdef void _move_row(self, Py_ssize_t src, Py_ssize_t dst):
        cdef Py_ssize_t j
        self.row_seq[dst] = self.row_seq[src]
        self.row_len[dst] = self.row_len[src]
        for j in range(self.width):
            self.tables[dst, j] = self.tables[src, j]
        self.row_of[self.row_seq[dst]] = dst

    cdef void _drop_rows(self, int64_t[::1] seen, int64_t stamp):
        """Free the rows whose sequence is not in this plan: the last row fills each hole."""
        cdef Py_ssize_t r = 0
        while r < self.n_rows:
            if seen[r] == stamp:
                r += 1
                continue
            del self.row_of[self.row_seq[r]]
            self.n_rows -= 1
            if r != self.n_rows:
                self._move_row(self.n_rows, r)
                seen[r] = seen[self.n_rows]
                self.plan_index[r] = self.plan_index[self.n_rows]

    cdef int _sync_table(self, Py_ssize_t r, list table) except -1:
        """Copy the block-table entries row r lacks; the whole row when the table is not
        an extension of what the row holds (released and reallocated, trimmed)."""
        cdef Py_ssize_t j, n = len(table), have = self.row_len[r]
        if n < have or (have and self.tables[r, have - 1] != <int32_t>table[have - 1]):
            have = 0
        if n > self.width:
            self._set_width(n)
        for j in range(have, n):
            self.tables[r, j] = <int32_t>table[j]
        if not have:        # a rewritten row: what a former occupant left past n goes
            for j in range(n, self.width):
                self.tables[r, j] = 0
        self.row_len[r] = <int32_t>n
        return 0

    def build(self, list plan):
        """plan: [(sequence, n_new_tokens)] -> (ForwardBatch fields as a tuple of arrays, plan index
        per row), or None when the step is not pure decode (some n != 1, or a sequence not caught
        up): the caller builds it the general way and resets this batch. Arrays are views of the
        persistent buffers: valid until the next build."""
        cdef Py_ssize_t k, r, n_plan = len(plan), bs = self.block_size, width = 1
        cdef int64_t seq_id
        cdef int32_t pos, block
        cdef list table
        for k in range(n_plan):
            seq, n = plan[k]
            if n != 1 or seq.num_computed_tokens + 1 != len(seq.token_ids):
                return None
        if n_plan > self._row_seq.shape[0]:
            self._allocate(2 * n_plan)
        seen_arr = np.zeros(self._row_seq.shape[0], dtype=np.int64)
        cdef int64_t[::1] seen = seen_arr
        new = []
        for k in range(n_plan):
            seq = plan[k][0]
            row = self.row_of.get(seq.seq_id)
            if row is None:
                new.append(k)
                continue
            r = row
            seen[r] = 1
            self.plan_index[r] = <int32_t>k
        self._drop_rows(seen, 1)
        for k in new:
            r = self.n_rows
            self.n_rows += 1
            seq = plan[k][0]
            self.row_seq[r] = seq.seq_id
            self.row_len[r] = 0
            self.row_of[seq.seq_id] = r
            self.plan_index[r] = <int32_t>k
        for r in range(self.n_rows):
            seq = plan[self.plan_index[r]][0]
            table = seq.block_table
            self._sync_table(r, table)
            if len(table) > width:
                width = len(table)
            pos = seq.num_computed_tokens
            if pos // bs >= len(table):
                self.reset()
                raise ValueError(f"sequence {seq.seq_id} has no KV block for position {pos}")
            block = self.tables[r, pos // bs]
            token_ids = seq.token_ids
            self.tokens[r] = <int32_t>token_ids[len(token_ids) - 1]
            self.positions[r] = pos
            self.slots[r] = block * <int32_t>bs + pos % <int32_t>bs
            self.context_lens[r] = pos + 1
        if width != self.width:
            self._set_width(width)
        n = self.n_rows
        arrays = (self._tokens[:n], self._positions[:n], self._slots[:n], self._tables[:n],
                  self._context_lens[:n], self._arange[:n + 1], self._arange[:n])
        return arrays, self._plan_index[:n].tolist()


def _grown(prev, Py_ssize_t keep, dtype, shape):
    """A zeroed array of `shape` holding prev's first `keep` rows."""
    new = np.zeros(shape, dtype=dtype)
    if prev is not None and keep:
        new[:keep] = prev[:keep]
    return new


def append_tokens(list seqs, const int32_t[::1] tokens, eos_ids):
    """Append tokens[i] to seqs[i].token_ids and return each one's status after it (a
    SequenceStatus value: RUNNING, FINISHED_STOPPED or FINISHED_LENGTH), as
    Sequence.check_finished decides. For sequences without a grammar matcher."""
    cdef Py_ssize_t i, n = len(seqs)
    cdef int32_t token
    if tokens.shape[0] != n:
        raise ValueError(f"{tokens.shape[0]} tokens for {n} sequences")
    statuses = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] out = statuses
    for i in range(n):
        seq = seqs[i]
        token = tokens[i]
        token_ids = seq.token_ids
        token_ids.append(token)
        p = seq.params
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
            out[i] = FINISHED_STOPPED
        elif len(token_ids) - <Py_ssize_t>seq.num_prompt_tokens >= <Py_ssize_t>seq.max_tokens:
            out[i] = FINISHED_LENGTH
        else:
            out[i] = RUNNING
    return statuses


def advance_computed(list plan, Py_ssize_t block_size):
    """After a forward pass: count each entry's new tokens as computed (drafts only once
    accepted). The sequences that completed a block not yet offered to the prefix cache,
    in plan order; none when block_size is 0 (prefix caching off)."""
    cdef Py_ssize_t k, computed
    full = []
    for k in range(len(plan)):
        seq, n = plan[k]
        drafts = seq.draft_tokens
        computed = seq.num_computed_tokens + n - (len(drafts) if drafts else 0)
        seq.num_computed_tokens = computed
        if block_size and computed // block_size > seq.num_registered_blocks:
            full.append(seq)
    return full


cdef inline bint _is_plain(seq):
    """Whether the native loops take `seq` on: no drafts to chunk, no prompt logprobs (whose
    prefill is capped to the logits rows and never reuses cached blocks), not an embedding."""
    return not seq.draft_tokens and seq.prompt_logprobs is None and seq.params.pooling is None


def schedule_running(scheduler, list plan, Py_ssize_t start, Py_ssize_t budget):
    """The scheduler's running loop (engine/scheduler.py) from running[start] on, over
    its plain sequences: each in order gets min(uncomputed tokens, budget) tokens,
    appended to `plan`, and blocks.allocate is asked for the blocks it lacks, while the
    budget lasts. When they run out the newest running sequence is preempted
    (scheduler.preempt) until they fit, or until the sequence itself is the one
    preempted. It stops at the first sequence that is not plain: the Python loop
    takes that one on and calls back. Returns (index of the next sequence, budget left);
    a sequence that preempted itself leaves the index at len(running)."""
    cdef list running = scheduler.running
    cdef Py_ssize_t i = start, n, total
    blocks = scheduler.blocks
    cdef Py_ssize_t block_size = blocks.block_size
    while i < len(running) and budget > 0:
        seq = running[i]
        if not _is_plain(seq):
            break
        n = len(seq.token_ids) - <Py_ssize_t>seq.num_computed_tokens
        if n > budget:
            n = budget
        total = seq.num_computed_tokens + n
        if (total + block_size - 1) // block_size > len(seq.block_table):
            while not blocks.allocate(seq, total):
                victim = running[len(running) - 1]
                scheduler.preempt(victim)
                if victim is seq:
                    return i, budget
        plan.append((seq, n))
        budget -= n
        i += 1
    return i, budget


def schedule_waiting(scheduler, list plan, Py_ssize_t budget):
    """The scheduler's waiting loop (engine/scheduler.py) over the plain sequences at
    the head of its queue, while the budget and max_num_seqs allow: a sequence without
    blocks first takes the cached blocks of its prompt's prefix, then gets
    min(uncomputed tokens, budget) tokens and the blocks for them, and moves to the
    running list. When the blocks are not there it stays at the head; and when nothing
    runs (nothing will free blocks) every waiting sequence's prefix claim is dropped,
    as one queued behind the head may hold the blocks the head needs. Returns
    (budget left, whether the Python loop has a non-plain head to take on)."""
    waiting = scheduler.waiting
    cdef list running = scheduler.running
    cdef Py_ssize_t n, computed, max_num_seqs = scheduler.max_num_seqs
    blocks = scheduler.blocks
    while waiting and budget > 0 and len(running) < max_num_seqs:
        seq = waiting[0]
        if not _is_plain(seq):
            return budget, True
        if not seq.block_table:
            seq.num_computed_tokens = blocks.reuse_prefix(seq)
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        computed = seq.num_computed_tokens
        n = len(seq.token_ids) - computed
        if n > budget:
            n = budget
        if not blocks.allocate(seq, computed + n):
            if not running:
                release_claims(waiting, blocks)
            break
        waiting.popleft()
        seq.status = _RUNNING_STATUS
        running.append(seq)
        plan.append((seq, n))
        budget -= n
    return budget, False


def release_claims(waiting, blocks):
    """Drop every waiting sequence's blocks (prefix claims): it starts from scratch."""
    for queued in waiting:
        blocks.release(queued)
        queued.num_computed_tokens = 0


def pack_sampling(list rows):
    """The sampler's per-row inputs in one pass over its rows (anything with `params` and
    `rng_state`: Sequences, speculative DraftRows): (columns, rng_state, wants_logprobs,
    n_top, penalised, biased). columns: temperature f32, top_k i32, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty f32 (engine/sampler.py's
    _PARAM_COLUMNS order); wants_logprobs uint8 (logprobs is not None); n_top the most
    top logprobs a row asks; penalised / biased whether any row has penalties / logit
    biases or min_tokens. SamplingParams checked the values at admission."""
    cdef Py_ssize_t i, n = len(rows)
    cdef int n_top = 0, k
    cdef double repetition_penalty, presence_penalty, frequency_penalty
    cdef bint penalised = False, biased = False
    temperature, top_k, top_p, min_p = (np.empty(n, np.float32), np.empty(n, np.int32),
                                        np.empty(n, np.float32), np.empty(n, np.float32))
    repetition, presence, frequency = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    rng_state, wants = np.empty(n, np.uint64), np.empty(n, np.uint8)
    cdef float[::1] t = temperature, tp = top_p, mp = min_p, rp = repetition, pp = presence, fp = frequency
    cdef int32_t[::1] tk = top_k
    cdef uint64_t[::1] rng = rng_state
    cdef uint8_t[::1] want = wants
    for i in range(n):
        row = rows[i]
        p = row.params
        t[i] = p.temperature
        tk[i] = p.top_k
        tp[i] = p.top_p
        mp[i] = p.min_p
        repetition_penalty, presence_penalty, frequency_penalty = (p.repetition_penalty, p.presence_penalty,
                                                                   p.frequency_penalty)
        rp[i], pp[i], fp[i] = repetition_penalty, presence_penalty, frequency_penalty
        rng[i] = row.rng_state
        logprobs = p.logprobs
        want[i] = logprobs is not None
        if logprobs is not None:
            k = logprobs
            if k > n_top:
                n_top = k
        if repetition_penalty != 1.0 or presence_penalty != 0.0 or frequency_penalty != 0.0:
            penalised = True
        if p.logit_bias or p.min_tokens:
            biased = True
    columns = (temperature, top_k, top_p, min_p, repetition, presence, frequency)
    return columns, rng_state, wants, n_top, penalised, biased


def greedy_wants(list rows):
    """For a step the backend may sample itself (greedy_tokens): None if some row is not plain
    greedy (temperature under the sampler's greedy bound, no penalties, logit biases, min_tokens
    or top logprobs), else uint8 [n]: whether each row asks for its token's logprob."""
    cdef Py_ssize_t i, n = len(rows)
    wants = np.empty(n, np.uint8)
    cdef uint8_t[::1] want = wants
    for i in range(n):
        p = rows[i].params
        if not (p.temperature < PF_GREEDY_TEMPERATURE) or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 \
                or p.frequency_penalty != 0.0 or p.logit_bias or p.min_tokens or p.logprobs:
            return None
        want[i] = p.logprobs is not None
    return wants


def rng_states(list rows):
    """uint64 [n]: each row's RNG state (the sampler advances them in place)."""
    cdef Py_ssize_t i, n = len(rows)
    states = np.empty(n, np.uint64)
    cdef uint64_t[::1] st = states
    for i in range(n):
        st[i] = rows[i].rng_state
    return states


def advance_rng_states(list rows):
    """Each row's RNG state one draw on, as the host sampler steps every row it samples
    (greedy ones too): SplitMix64 adds its increment per draw."""
    cdef Py_ssize_t i
    cdef uint64_t state
    for i in range(len(rows)):
        state = rows[i].rng_state
        rows[i].rng_state = state + PF_RNG_GAMMA


def store_rng_states(list rows, const uint64_t[::1] rng_state):
    """rows[i].rng_state = rng_state[i] (the sampler advanced them)."""
    cdef Py_ssize_t i
    if rng_state.shape[0] != len(rows):
        raise ValueError(f"{rng_state.shape[0]} RNG states for {len(rows)} rows")
    for i in range(len(rows)):
        rows[i].rng_state = rng_state[i]


# plan_kinds bits: which per-sequence cases a step's plan holds
KIND_POOLING = 1            # an embedding request (params.pooling)
KIND_PROMPT_LOGPROBS = 2    # prompt logprobs asked (seq.prompt_logprobs is not None)
KIND_DRAFTS = 4             # speculative drafts to verify
KIND_GRAMMAR = 8            # a grammar matcher constrains it


def plan_kinds(list plan):
    """The KIND_* bits of the cases present among plan's sequences, in one pass: the
    usual decode step has none and skips every per-case scan."""
    cdef int kinds = 0
    for seq, _ in plan:
        if seq.params.pooling is not None:
            kinds |= KIND_POOLING
        if seq.prompt_logprobs is not None:
            kinds |= KIND_PROMPT_LOGPROBS
        if seq.draft_tokens:
            kinds |= KIND_DRAFTS
        if seq.matcher is not None:
            kinds |= KIND_GRAMMAR
    return kinds


# -- publishing a plain step -------------------------------------------------------

cdef extern from "pyforge_ipc.h":
    ctypedef struct pf_record_header:
        uint8_t type
        uint8_t flags
        uint16_t worker
        uint64_t request_id
    ctypedef struct pf_tokens:
        uint32_t n
        uint16_t n_top
        uint16_t has
    ctypedef struct pf_finish:
        uint32_t prompt_tokens
        uint32_t completion_tokens
        uint32_t cached_tokens
        uint8_t finish_reason
    enum: PF_REC_TOKENS, PF_REC_FINISH, PF_FINISH_STOP, PF_FINISH_LENGTH


cdef char *_grow(bytearray buf, Py_ssize_t n) except NULL:
    """n more bytes at the end of buf (bytearray over-allocates: amortised O(1)): where they start."""
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, at + n)
    return PyByteArray_AS_STRING(buf) + at


cdef void _put_header(char *at, uint8_t rtype, uint64_t request_id) noexcept:
    cdef pf_record_header header
    header.type, header.flags, header.worker, header.request_id = rtype, 0, 0, request_id
    memcpy(at, &header, sizeof(header))


cdef int _put_token(bytearray buf, uint64_t request_id, int32_t token) except -1:
    """encode_token(request_id, token): a TOKENS record of one token, no logprobs."""
    cdef char *at = _grow(buf, sizeof(pf_record_header) + sizeof(pf_tokens) + sizeof(int32_t))
    cdef pf_tokens body
    body.n, body.n_top, body.has = 1, 0, 0
    _put_header(at, PF_REC_TOKENS, request_id)
    memcpy(at + sizeof(pf_record_header), &body, sizeof(body))
    memcpy(at + sizeof(pf_record_header) + sizeof(body), &token, sizeof(token))
    return 0


cdef int _put_finish(bytearray buf, uint64_t request_id, seq, int status) except -1:
    """encode(Finish(...)) of seq, which ended with `status` (FINISHED_STOPPED or _LENGTH)."""
    cdef pf_finish body
    cdef uint32_t prompt = seq.num_prompt_tokens
    body.prompt_tokens = prompt
    body.completion_tokens = <Py_ssize_t>len(seq.token_ids) - prompt
    body.cached_tokens = seq.num_cached_prompt_tokens
    if status == FINISHED_STOPPED:
        body.finish_reason = PF_FINISH_STOP
    elif status == FINISHED_LENGTH:
        body.finish_reason = PF_FINISH_LENGTH
    else:
        raise ValueError(f"status {status} is not one a plain step ends with (stopped or length)")
    cdef char *at = _grow(buf, sizeof(pf_record_header) + sizeof(pf_finish))
    _put_header(at, PF_REC_FINISH, request_id)
    memcpy(at + sizeof(pf_record_header), &body, sizeof(body))
    return 0


def publish_plain(list seqs, const int32_t[::1] tokens, const int32_t[::1] statuses, dict by_seq, dict entries,
                  dict batches, reply_one):
    """A plain step's replies (engine.PlainOutputs: row i is seqs[i], which got tokens[i] and
    now has statuses[i]), written as RingReplies would write them, in the same order:
    per row whose request is still in the table (by_seq: seq id -> Entry), a TOKENS record
    and, if it ended, a FINISH record (its entry leaves by_seq and entries, request id ->
    Entry), appended to batches[entry.owner.slot] = (bytearray of records, [entries]).
    A request that asked for logprobs goes to reply_one(entry, row) instead (Python's
    records, into the same batches, so the order holds). Returns the prompt tokens of the
    requests that had their first token now (entry.started turns true)."""
    cdef Py_ssize_t i, n = len(seqs), started = 0
    cdef uint64_t request_id
    cdef int status
    cdef bytearray buf
    cdef list sent
    last_slot = None
    if tokens.shape[0] != n or statuses.shape[0] != n:
        raise ValueError(f"{tokens.shape[0]} tokens and {statuses.shape[0]} statuses for {n} sequences")
    for i in range(n):
        seq = seqs[i]
        seq_id = seq.seq_id
        entry = by_seq.get(seq_id)
        if entry is None:
            continue
        if not entry.started:
            entry.started = True
            started += <Py_ssize_t>seq.num_prompt_tokens
        if entry.want_logprobs:
            reply_one(entry, i)
            continue
        slot = entry.owner.slot
        if slot is not last_slot:      # a run of one worker's rows: no dict lookup
            batch = batches.get(slot)
            if batch is None:
                batch = batches[slot] = (bytearray(), [])
            buf, sent = <tuple?>batch
            last_slot = slot
        request_id = entry.request_id
        status = statuses[i]
        _put_token(buf, request_id, tokens[i])
        if status != RUNNING:
            _put_finish(buf, request_id, seq, status)
            del by_seq[seq_id]
            entries.pop(entry.request_id, None)
        sent.append(entry)
    return started
