"""A do-nothing model: the serving stack's ceiling with the forward pass taken out.

`pyforge serve --null-model` (LLM_NULL_MODEL=1) swaps this in for the real
architecture. The engine still reads the model file's config and tokenizer,
schedules, allocates KV blocks, samples and publishes as usual; only the
matmuls are gone. Every logits row puts all its mass on one fixed token that
is not an end-of-generation token, so greedy and sampled requests alike run to
max_tokens. What is left is the cost of HTTP, IPC, scheduling and sampling:
tokens/s measured against it is pyforge's own upper bound.
"""
import numpy as np

PEAK = 30.0     # logit of the fixed token; every other logit is 0: p(other) ~ vocab * e^-30


class NullModel:
    def __init__(self, config, token_id):
        self.config = config
        self.token_id = int(token_id)
        self._logits = np.zeros((0, config.vocab_size), dtype=np.float32)

    @staticmethod
    def activation_bytes(n_tokens, n_rows):
        return 0        # no forward pass

    def forward(self, batch, kv_cache):
        """Logits f32[len(batch.logits_rows), vocab]: PEAK at token_id, 0 elsewhere.

        Rows of one buffer kept across calls, filled once: making the logits is
        the forward pass's work, which this model leaves out (fresh zeros cost
        ~0.35 ms a step for 64 rows, a third of sampling them). The engine only
        reads them; the sampler restores what it borrows as scratch."""
        n = len(batch.logits_rows)
        if n > len(self._logits):
            self._logits = np.zeros((max(n, 2 * len(self._logits)), self.config.vocab_size), dtype=np.float32)
            self._logits[:, self.token_id] = PEAK
        return self._logits[:n]

    def hidden(self, batch, kv_cache):
        """A final hidden state f32[len(batch.logits_rows), hidden_size] of ones (embeddings)."""
        return np.ones((len(batch.logits_rows), self.config.hidden_size), dtype=np.float32)


def pick_token(tokenizer, vocab_size):
    """A printable, non-EOS token to emit (so streamed chunks carry text)."""
    for text in (" the", "a", "x"):
        ids = [t for t in tokenizer.encode(text, add_bos=False) if t not in tokenizer.eos_ids]
        if ids and 0 <= ids[-1] < vocab_size and tokenizer.decode([ids[-1]]):
            return ids[-1]
    return next(t for t in range(vocab_size) if t not in tokenizer.eos_ids)
