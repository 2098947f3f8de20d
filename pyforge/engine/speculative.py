"""N-gram (prompt lookup) speculative decoding, verified inside the normal step.

Drafts. Before each step a decoding sequence's own tokens (prompt + output) propose
up to k next tokens: the longest recent n-gram of its tail (prompt_lookup_max down
to prompt_lookup_min tokens) that occurred before proposes what followed it
(native/ngram_index.pyx, an incremental index per sequence).

Verification. The scheduler runs the sequence's last token + its k drafts under the
one token budget (drafts sit in `seq.draft_tokens`, outside `seq.token_ids`); the
model returns logits for all k+1 rows; row i is sampled as if drafts[:i] had been
accepted (its penalties and min_tokens see them), with the RNG state the sequence
would have at that output position (SplitMix64 advances by a constant per token:
row i starts at state + i * GAMMA). Drafts are accepted while the sampled token
equals the draft; the first disagreeing row's token (or row k's, when all agree)
is emitted too. For greedy rows that is "accept while argmax == draft". For sampled
rows it is the speculative-sampling rule with q one-hot on the draft d, realised by
coupling: the row's draw is an inverse-CDF draw from p, so it equals d with
probability p(d) = min(1, p(d) / q(d)) (accept), and given that it is not d it is
distributed as p with d's mass removed and renormalised (the resample on
rejection). Because the draw at each output position uses the same uniform it would
use without speculation, the emitted tokens are identical to non-speculative
decoding for greedy and seeded requests alike, and the distribution is p's.

KV. The k+1 rows write K/V at positions T-1 .. T+k-1; only the accepted drafts'
count as computed (the rest are overwritten later) and blocks past the sequence's
tokens are freed at once; prefix-cache hashing registers only accepted tokens.

Adaptive draft length (DraftState): k grows by one after a fully accepted draft,
drops to the accepted length + 1 after a partial one; MISS_STREAK drafts in a row
with nothing accepted turn the sequence's speculation off (k = 0) for a pause that
doubles each time (up to MAX_PAUSE steps), after which it probes with k = 1.
A sequence whose tail never recurs proposes nothing and pays only the lookup.

Batch rule: a step with more decoding sequences than `disable_by_batch_size` runs
no drafts: a big batch is compute-bound, so verifying k extra rows per sequence
costs what it saves (benchmarks/bench_speculative.py measures the crossover).

Structured output: a constrained sequence's drafts are cut to the prefix its grammar
matcher accepts (validate_tokens) before verification, and row i is masked with the
grammar's state after drafts[:i] (engine/guided.py), so it samples what plain guided
decoding would. Not speculated: embedding requests and requests that opt out
(`SamplingParams.max_drafts` 0); a request's max_drafts caps its k below the config's.
"""
from pyforge.engine.config import MAX_SPECULATIVE_TOKENS
from pyforge.native.ngram_index import NgramIndex

GAMMA = 0x9E3779B97F4A7C15      # SplitMix64's per-draw increment (native/sampler_kernels.c)
U64 = (1 << 64) - 1
MISS_STREAK = 2                 # drafts in a row with nothing accepted before a pause
FIRST_PAUSE, MAX_PAUSE = 4, 64  # steps without drafts after a miss streak (doubling)


class DraftState:
    """One sequence's speculation: its n-gram index and adaptive draft length."""
    __slots__ = ("index", "k", "misses", "pause", "next_pause")

    def __init__(self, config):
        self.index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        self.k = config.num_speculative_tokens
        self.misses = 0             # drafts in a row with nothing accepted
        self.pause = 0              # steps left without drafts
        self.next_pause = FIRST_PAUSE

    def adapt(self, proposed, accepted, k_max):
        """Update k after a draft of `proposed` tokens of which `accepted` were."""
        if accepted == proposed:
            self.k = min(k_max, self.k + 1)
        else:
            self.k = max(1, accepted + 1)
        if accepted:
            self.misses, self.next_pause = 0, FIRST_PAUSE
            return
        self.misses += 1
        if self.misses >= MISS_STREAK:
            self.k, self.misses, self.pause = 0, 0, self.next_pause
            self.next_pause = min(MAX_PAUSE, 2 * self.next_pause)

    def budget(self):
        """Drafts this sequence may run this step (a paused one counts its pause down)."""
        if self.k == 0:
            self.pause -= 1
            if self.pause > 0:
                return 0
            self.k = 1          # probe again
        return self.k


class Speculator:
    """Proposes drafts before a step and keeps the counters (vLLM's spec_decode metrics)."""

    def __init__(self, config, max_drafts, guided):
        self.config = config
        self.guided = guided            # GuidedDecoding: a constrained sequence drafts what its grammar allows
        self.max_drafts = max_drafts    # per step, all sequences together (activation memory holds them)
        self.num_drafts = 0             # verified drafts (sequences x steps with drafts)
        self.num_draft_tokens = 0       # drafted tokens verified
        self.num_accepted_tokens = 0    # of those, accepted
        # acceptance lengths: accepted_per_draft[a] drafts had a tokens accepted
        self.accepted_per_draft = [0] * (config.num_speculative_tokens + 1)

    def propose(self, running):
        """Set `draft_tokens` on the running sequences that speculate this step (and clear
        the others': one the scheduler left out last step may still hold some)."""
        for seq in running:
            seq.draft_tokens = []
        decoding = [seq for seq in running if _caught_up(seq)]
        if len(decoding) > self.config.disable_by_batch_size:
            return
        rows_left = self.max_drafts
        for seq in decoding:
            if rows_left <= 0:
                return
            if not _may_speculate(seq):
                continue
            state = seq.draft_state
            if state is None:
                state = seq.draft_state = DraftState(self.config)
            # the last emitted token is always one of this step's: drafts fill what is left
            k = min(state.budget(), _request_cap(seq), seq.max_tokens - seq.num_output_tokens - 1, rows_left)
            if k <= 0:
                continue
            state.index.extend(seq.token_ids)
            seq.draft_tokens = self.guided.valid_drafts(seq, state.index.propose(k))
            rows_left -= len(seq.draft_tokens)

    def verified(self, seq, proposed, accepted):
        """Record a verified draft and adapt the sequence's draft length."""
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.accepted_per_draft[accepted] += 1
        seq.draft_state.adapt(proposed, accepted, min(self.config.num_speculative_tokens, _request_cap(seq)))

    @property
    def acceptance_rate(self):
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class DraftRow:
    """Row i (>= 1) of a drafted sequence's verification, as the sampler sees it: the
    sequence with drafts[:i] appended and the RNG state of that output position."""
    __slots__ = ("seq", "i", "rng_state")

    def __init__(self, seq, i):
        self.seq, self.i = seq, i
        self.rng_state = (seq.rng_state + i * GAMMA) & U64

    @property
    def params(self):
        return self.seq.params

    @property
    def num_prompt_tokens(self):
        return self.seq.num_prompt_tokens

    @property
    def num_output_tokens(self):
        return self.seq.num_output_tokens + self.i

    @property
    def token_ids(self):
        return self.seq.token_ids + self.seq.draft_tokens[:self.i]


def verify_rows(seq):
    """The sampler rows of a sequence's step: itself, then a DraftRow per draft."""
    return [seq, *(DraftRow(seq, i) for i in range(1, len(seq.draft_tokens) + 1))]


def accepted_prefix(drafts, tokens):
    """How many rows' tokens to emit: the agreeing prefix of drafts, plus the next row's."""
    n = 0
    while n < len(drafts) and tokens[n] == drafts[n]:
        n += 1
    return n + 1


def _caught_up(seq):
    return seq.num_computed_tokens + 1 == seq.num_tokens


def _may_speculate(seq):
    p = seq.params
    return p.max_drafts != 0 and p.pooling is None


def _request_cap(seq):
    """The most drafts the request allows per step (its max_drafts; unbounded when unset)."""
    cap = seq.params.max_drafts
    return MAX_SPECULATIVE_TOKENS if cap is None else cap
