"""One generation: its tokens, progress, KV blocks and status."""
from enum import IntEnum


class SequenceStatus(IntEnum):
    """Ordered: everything at or past FINISHED_STOPPED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self):
        return self >= SequenceStatus.FINISHED_STOPPED


# finished state -> OpenAI finish_reason
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


def check_prompt_ids(prompt_ids, max_model_len, vocab_size=None):
    """The checks every entry point applies to a tokenized prompt (ValueError -> HTTP 400)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context holds {max_model_len}, "
            "which must leave room for at least one generated token"
        )
    if vocab_size is not None:
        bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


class Sequence:
    def __init__(self, seq_id, prompt_ids, params, rng_state, max_model_len):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.seq_id = seq_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.rng_state = rng_state
        # never generate past the context window
        self.max_tokens = min(params.max_tokens, max_model_len - len(prompt_ids))
        self.num_computed_tokens = 0   # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0  # of those, reused from the prefix cache
        self.block_table = []
        self.block_keys = []            # prefix-cache keys of the full blocks, in order
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = SequenceStatus.WAITING
        self.matcher = None             # llguidance's, when params.grammar constrains the output
        # prompt tokens 1.. as PromptLogprobs, when params.prompt_logprobs asks (engine/prompt_logprobs.py)
        self.prompt_logprobs = [] if params.prompt_logprobs is not None else None
        # an embedding request's pooled rows so far (engine/pooling.py): their sum (mean pooling)
        # and how many prompt positions it holds (a preempted sequence does not add a row twice)
        self.pooled_sum = None
        self.pooled_rows = 0
        # speculative decoding (engine/speculative.py): this step's drafted next tokens (run after
        # the last token, never in token_ids until accepted) and the sequence's DraftState
        self.draft_tokens = []
        self.draft_state = None

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def num_output_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_prompt_logits(self):
        """Its prompt logprobs are not all recorded: its prefill needs logits at every row."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def reuses_prefix(self):
        """Whether cached prefix blocks may stand in for its prompt's computation: not when its
        prefill yields per-row results (prompt logprobs still due, an embedding: cached blocks
        have neither, and an embedding does not depend on what happens to be cached)."""
        return not self.needs_prompt_logits and self.params.pooling is None

    @property
    def finish_reason(self):
        return FINISH_REASONS.get(self.status)

    def check_finished(self, token_id, eos_ids):
        """Status after appending token_id (the caller appended it)."""
        p = self.params
        if not p.ignore_eos and token_id in eos_ids:
            return SequenceStatus.FINISHED_STOPPED
        if token_id in p.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if self.matcher is not None and self.matcher.is_stopped():   # the grammar is complete
            return SequenceStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        return SequenceStatus.RUNNING
