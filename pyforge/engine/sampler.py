"""Sampling glue: pack each sequence's SamplingParams and token history into
arrays and sample the whole batch in one native call (pyforge.native.sampler,
whose contract is written down in native/sampler_kernels.h)."""
import secrets
from collections import abc
from dataclasses import dataclass, field

import numpy as np

from pyforge.native import sampler as native
from pyforge.native import step_core

_U64 = (1 << 64) - 1

# SamplingParams field -> dtype of the per-row array the native call takes
_PARAM_COLUMNS = (
    ("temperature", np.float32),
    ("top_k", np.int32),
    ("top_p", np.float32),
    ("min_p", np.float32),
    ("repetition_penalty", np.float32),
    ("presence_penalty", np.float32),
    ("frequency_penalty", np.float32),
)


@dataclass(slots=True)      # not frozen: a frozen dataclass costs ~4x as much to make, once per token
class SampleResult:
    token_id: int
    logprob: float                                      # raw log-softmax of token_id
    top_logprobs: list = field(default_factory=list)    # [(token_id, logprob)], best first


class Sampler:
    """Samples a batch per call and keeps nothing between calls: each sequence
    carries its own RNG state (`seq.rng_state`), which `sample` advances.

    Every result carries the chosen token's raw logprob unless `all_logprobs`
    is off: then only rows whose params ask for logprobs get it (NaN for the
    rest, whose log-softmax, most of a greedy row's cost, is skipped). The
    serving engine turns it off: it sends logprobs only to who asked.

    A row's logit biases are its params' `logit_bias` and, while it has fewer
    than `min_tokens` output tokens, a ban (-inf) on `eos_ids` (unless it
    ignores EOS) and its `stop_token_ids`."""

    def __init__(self, n_threads=0, all_logprobs=True, eos_ids=()):
        self.n_threads = n_threads   # 0: OpenMP's default
        self.all_logprobs = all_logprobs
        self.eos_ids = tuple(eos_ids)

    @staticmethod
    def seed_state(seed=None):
        """RNG state for a seed: SplitMix64's state is the seed mod 2^64.
        None draws a fresh random one."""
        return (secrets.randbits(64) if seed is None else seed) & _U64

    @staticmethod
    def check_params(params):
        """ValueError if `params` would not pack into the batch's arrays (checked at
        admission, so one request's values can never fail a batched step)."""
        try:
            _param_arrays([params])
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"sampling parameters out of range: {e}") from None

    def sample(self, logits, seqs, masks=None):
        """One token per sequence: a SampledBatch (a sequence of SampleResult). logits:
        f32[len(seqs), vocab], row i for seqs[i] (left unchanged). Each seq exposes
        `params` (SamplingParams), `token_ids` (prompt then output), `num_prompt_tokens`
        and `rng_state`. masks: None, or (bits uint32[n_masks, words], mask_of
        int32[len(seqs)]), the allowed tokens of the constrained rows (engine/guided.py);
        a row whose mask allows nothing gets token -1."""
        if len(seqs) != len(logits):
            raise ValueError(f"{len(logits)} rows of logits for {len(seqs)} sequences")
        if not seqs:
            return SampledBatch(np.zeros(0, np.int32), np.zeros(0, np.float32), None)
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if not logits.flags.writeable:   # the kernel borrows rows as scratch
            logits = logits.copy()
        wants = step_core.greedy_wants(seqs) if masks is None else None
        if wants is not None:           # all plain greedy: the kernel without the parameter columns
            rng_state = step_core.rng_states(seqs)
            tokens, logprobs = native.sample_greedy(logits, rng_state, None if self.all_logprobs else wants,
                                                    n_threads=self.n_threads)
            step_core.store_rng_states(seqs, rng_state)
            return SampledBatch(tokens, logprobs, None)
        # one native pass over the rows' params and RNG states (native/step_core.pyx)
        columns, rng_state, wants, n_top, penalised, biased = step_core.pack_sampling(seqs)
        n_top = min(n_top, logits.shape[1])
        want = None if self.all_logprobs else wants
        bias = _biases(seqs, self.eos_ids, logits.shape[1]) if biased else (None, None, None)
        tokens, logprobs, top_ids, top_logprobs = native.sample(
            logits, *columns, *_history(seqs, penalised), rng_state,
            n_top_logprobs=n_top, n_threads=self.n_threads, want_logprobs=want,
            mask_bits=masks[0] if masks else None, mask_of=masks[1] if masks else None,
            bias_offsets=bias[0], bias_ids=bias[1], bias_values=bias[2],
        )
        step_core.store_rng_states(seqs, rng_state)
        if not n_top:
            return SampledBatch(tokens, logprobs, None)
        return SampledBatch(tokens, logprobs, [
            list(zip(ids[:seq.params.logprobs or 0], lps[:seq.params.logprobs or 0]))
            for seq, ids, lps in zip(seqs, top_ids.tolist(), top_logprobs.tolist())
        ])


class SampledBatch(abc.Sequence):
    """A step's samples: a read-only sequence of SampleResult, made on demand from the
    native call's arrays, which the engine's plain step reads directly.
    tokens int32[n], logprobs float32[n] (NaN where skipped), top None (nobody asked)
    or a [(token_id, logprob)] list per row."""
    __slots__ = ("tokens", "logprobs", "top")

    def __init__(self, tokens, logprobs, top):
        self.tokens, self.logprobs, self.top = tokens, logprobs, top

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return SampleResult(int(self.tokens[i]), float(self.logprobs[i]), self.top[i] if self.top is not None else [])

    def __iter__(self):
        tops = self.top if self.top is not None else ([] for _ in range(len(self)))
        return map(SampleResult, self.tokens.tolist(), self.logprobs.tolist(), tops)


def _param_arrays(params):
    return [np.array([getattr(p, name) for p in params], dtype=dtype) for name, dtype in _PARAM_COLUMNS]


def _history(seqs, penalised):
    """The penalties' token history as CSR: offsets, ids, output counts."""
    if not penalised:       # the usual batch: nothing to build
        return np.zeros(len(seqs) + 1, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    rows = [_penalised_tokens(seq) for seq in seqs]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(ids) for ids, _ in rows], out=offsets[1:])
    ids = np.concatenate([ids for ids, _ in rows]).astype(np.int32)
    counts = np.concatenate([counts for _, counts in rows]).astype(np.int32)
    return offsets, ids, counts


def _biases(seqs, eos_ids, vocab):
    """The rows' logit biases as CSR (offsets, ids, values) (some row has logit_bias or min_tokens)."""
    rows = [_row_bias(seq, eos_ids, vocab) for seq in seqs]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    n = int(offsets[-1])
    ids = np.fromiter((t for row in rows for t in row), dtype=np.int32, count=n)
    values = np.fromiter((b for row in rows for b in row.values()), dtype=np.float32, count=n)
    return offsets, ids, values


def _row_bias(seq, eos_ids, vocab):
    """{token id: bias} of one row: logit_bias, and the min_tokens bans while they hold
    (a stop id outside the vocabulary can never come: nothing to ban)."""
    p = seq.params
    bias = dict(p.logit_bias)
    if p.min_tokens and seq.num_output_tokens < p.min_tokens:
        banned = p.stop_token_ids if p.ignore_eos else (*eos_ids, *p.stop_token_ids)
        bias.update((t, -np.inf) for t in banned if t < vocab)
    return bias


def _penalised_tokens(seq):
    """(unique token ids, their counts in the output) for one sequence; empty
    without penalties, so most rows cost nothing and long prompts are not
    rescanned every step."""
    p = seq.params
    if p.repetition_penalty != 1.0:   # every token of prompt and output
        tokens = np.asarray(seq.token_ids, dtype=np.int64)
        ids, where = np.unique(tokens, return_inverse=True)
        return ids, np.bincount(where[seq.num_prompt_tokens:], minlength=len(ids))
    if p.presence_penalty or p.frequency_penalty:   # output tokens only
        return np.unique(np.asarray(seq.token_ids[seq.num_prompt_tokens:], dtype=np.int64),
                         return_counts=True)
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
