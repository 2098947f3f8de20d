"""Per-request sampling parameters: OpenAI / vLLM names and meanings, checked once."""
import math
from dataclasses import dataclass
from numbers import Integral, Real

MAX_TEMPERATURE = 100.0   # OpenAI stops at 2; vLLM takes more, and so do we
MAX_TOP_LOGPROBS = 20     # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 100.0    # OpenAI's range for a logit_bias value: [-100, 100]
POOLINGS = ("mean", "last")  # an embedding's pooling: the mean of the prompt's rows, or its last row
INT32_MAX = (1 << 31) - 1  # top_k, max_tokens and token ids travel as int32 (sampler, IPC records)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0: greedy (below 1e-5 the sampler is greedy too)
    top_p: float = 1.0               # nucleus mass in (0, 1]; 1: off
    top_k: int = 0                   # keep the k most likely; 0 or -1: off
    min_p: float = 0.0               # drop p < min_p * p_max; 0: off
    repetition_penalty: float = 1.0  # HF / vLLM, over prompt + output tokens; 1: off
    presence_penalty: float = 0.0    # OpenAI, over output tokens: - presence * [count > 0]
    frequency_penalty: float = 0.0   # OpenAI, over output tokens: - frequency * count
    seed: int | None = None          # None: the engine draws one at admission
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None      # top logprobs per token, 0..20; None: none
    # an llguidance grammar (pyforge.structured builds one from a JSON schema, regex,
    # choice list, GBNF or Lark) the output must match; None: unconstrained
    grammar: str | None = None
    # OpenAI: added to the token's logit before sampling, in [-100, 100] (-100 bans it in
    # effect, 100 forces it); a {token id: bias} dict or (id, bias) pairs, kept as sorted pairs
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0              # vLLM: EOS and stop_token_ids are banned before this many tokens
    # vLLM: the logprob of every prompt token after the first (the engine computes logits at
    # every prompt position, without prefix reuse) and this many top alternatives; None: none
    prompt_logprobs: int | None = None
    # an embedding request (engine/pooling.py): no sampling; the final hidden state (after the
    # final norm) pooled over the prompt by POOLINGS' rule and L2-normalised; None: generate
    pooling: str | None = None
    # n-gram speculative decoding (engine/speculative.py), when the engine has it on: at most
    # this many drafted tokens per step for this request (llama-server's speculative.n_max; the
    # engine's num_speculative_tokens caps it); 0 opts out; None: the engine's. The output is
    # the same either way: only the speed differs
    max_drafts: int | None = None

    def __post_init__(self):
        # frozen, but callers pass lists; a tuple keeps the object hashable
        try:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        except TypeError:
            raise ValueError(f"stop_token_ids must be a list of token ids, got {brief(self.stop_token_ids)}") from None
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field out of range."""
        _in_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _in_range("min_p", self.min_p, 0.0, 1.0)
        _real("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0, got {brief(self.repetition_penalty)}")
        _in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        # every bound here keeps a value inside what a batched step packs (int32 / uint64):
        # a value past them would fail the step of every sequence batched with it
        _integer("top_k", self.top_k, low=-1, high=INT32_MAX)
        _integer("max_tokens", self.max_tokens, low=1, high=INT32_MAX)
        if self.seed is not None:
            _integer("seed", self.seed)      # any size: the RNG state is the seed mod 2^64
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=MAX_TOP_LOGPROBS)
        for token in self.stop_token_ids:
            _integer("stop_token_ids", token, low=0, high=INT32_MAX)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {brief(self.ignore_eos)}")
        if self.max_drafts is not None:
            _integer("max_drafts", self.max_drafts, low=0, high=INT32_MAX)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError(f"grammar must be a non-empty string, got {brief(self.grammar)}")
        for token, bias in self.logit_bias:
            _integer("logit_bias", token, low=0, high=INT32_MAX)
            _in_range("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        _integer("min_tokens", self.min_tokens, low=0, high=INT32_MAX)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if self.pooling is not None:
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {brief(self.pooling)}")
            generating = [name for name in ("logprobs", "prompt_logprobs", "grammar")
                          if getattr(self, name) is not None]
            if generating:      # an embedding request samples nothing: none of these could be honoured
                raise ValueError(f"an embedding request (pooling) takes no {generating[0]}")


def _bias_pairs(value):
    """logit_bias as (token id, bias) pairs sorted by id; ValueError on a repeated id."""
    try:
        pairs = tuple(sorted((value.items() if isinstance(value, dict) else value), key=lambda pair: pair[0]))
        if any(len(pair) != 2 for pair in pairs):
            raise TypeError
    except TypeError:
        raise ValueError(f"logit_bias must map token ids to numbers, got {brief(value)}") from None
    for (a, _), (b, _) in zip(pairs, pairs[1:]):
        if a == b:
            raise ValueError(f"logit_bias names token {brief(a)} twice")
    return tuple(tuple(pair) for pair in pairs)


def brief(value, limit=40):
    """repr(value) cut to `limit` characters: error messages never echo a whole request value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {brief(value)}")
    try:
        value = float(value)        # an integer literal past 1e308 overflows here
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")


def _in_range(name, value, low, high, low_open=False):
    _real(name, value)
    if not (low < value if low_open else low <= value) or not value <= high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {brief(value)}")


def _integer(name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {brief(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {brief(value)}")
