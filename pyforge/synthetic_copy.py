"""Copy models: synthetic models whose greedy continuation follows fixed token cycles.

A random-weight model never repeats its input, so it cannot stand in for a trained model
that quotes its prompt (the case n-gram speculative decoding speeds up). A copy model has
a real config's shapes and file format (so a step costs what that model's step costs) and
weights built so that greedy decoding follows a fixed permutation of the vocabulary:

    next(t) = successor[t]      tokens 3 .. vocab-1 in a seeded order, cut into cycles of
                                `cycle` tokens (the last may be shorter); the special tokens
                                0-2 lead into the first cycle and are never predicted

How. token_embd rows are N(0, 1) (unit-scale vectors, nearly orthogonal in d dimensions);
output row j is the sum of the embeddings of the tokens whose successor is j, scaled so the
winning logit is about LOGIT_TOP. Attention and MLP weights are the ordinary random ones
(N(0, 0.02^2); their compute is what a benchmark measures), except that the two
projections writing into the residual stream (attn_output, ffn_down) are RESIDUAL_SHRINK
times smaller: the layers then perturb the current token's embedding but never outweigh it,
so the final hidden state points at successor[t]'s output row. The model looks only at the
current token; a prompt that walks a cycle gets its own continuation back, and prompt-lookup
drafts are then accepted.

    COPY_CYCLES["tinyllama-1.1b-copy"]      cycle length of each copy config
    successors("small-k-copy")              the permutation (numpy int64, vocab-size)
    walk(successors, start, n)              n tokens from `start` along the cycle
"""
import zlib

import numpy as np

FIRST_CYCLED = 3            # ids 0-2 (unk, bos, eos) are in no cycle: never predicted
EMBEDDING_STD = 1.0
RESIDUAL_SHRINK = 0.1
LOGIT_TOP = 20.0            # about the logit of the predicted token (the rest: about LOGIT_TOP / sqrt(d))
COPY_CYCLES = {"tinyllama-1.1b-copy": 16, "small-k-copy": 8}


def is_copy_config(config_name):
    return isinstance(config_name, str) and config_name in COPY_CYCLES


def successors(config_name, vocab_size=None, seed=0):
    """successor[t] for every token t of a copy config (its vocabulary unless vocab_size is given)."""
    if not is_copy_config(config_name):
        raise ValueError(f"{config_name!r} is not a copy config (known: {', '.join(COPY_CYCLES)})")
    if vocab_size is None:
        from pyforge.synthetic import get_config
        vocab_size = get_config(config_name).vocab_size
    cycle = COPY_CYCLES[config_name]
    order = np.random.default_rng([seed, zlib.crc32(b"copy-cycles")]).permutation(
        np.arange(FIRST_CYCLED, vocab_size))
    nxt = np.empty(vocab_size, dtype=np.int64)
    for start in range(0, len(order), cycle):
        members = order[start:start + cycle]
        nxt[members] = np.roll(members, -1)
    nxt[:FIRST_CYCLED] = order[0]
    return nxt


def walk(successor, start, n):
    """n tokens: start, successor[start], ..."""
    out = [int(start)]
    while len(out) < n:
        out.append(int(successor[out[-1]]))
    return out


class CopyWeights:
    """make_tensor's stand-in for a copy config: the same random weights, except the
    embedding, the output head and the residual-writing projections (see the module doc)."""

    def __init__(self, config_name, cfg, seed):
        from pyforge.synthetic import make_tensor
        if cfg.tie_embeddings:
            raise ValueError(f"{config_name}: a copy model needs its own output head (tie_embeddings is set)")
        self.make_tensor, self.cfg, self.seed = make_tensor, cfg, seed
        self.successor = successors(config_name, cfg.vocab_size, seed)
        self._embedding = None

    def embedding(self):
        if self._embedding is None:
            shape = (self.cfg.vocab_size, self.cfg.hidden_size)
            self._embedding = self.make_tensor("token_embd.weight", shape, self.seed) * np.float32(
                EMBEDDING_STD / 0.02)
        return self._embedding

    def output_head(self, shape):
        """Row j: the embeddings of j's predecessors, so that the final hidden state of token t
        (about its embedding, normalised to rms 1) scores successor[t] at about LOGIT_TOP."""
        head = self.make_tensor("output.weight", shape, self.seed)      # the specials' rows stay random
        head[FIRST_CYCLED:] = 0.0
        scale = np.float32(LOGIT_TOP / (self.cfg.hidden_size * EMBEDDING_STD))
        cycled = slice(FIRST_CYCLED, None)      # successor maps these one to one
        head[self.successor[cycled]] = self.embedding()[cycled] * scale
        head[self.successor[0]] += self.embedding()[:FIRST_CYCLED].sum(axis=0) * scale
        return head

    def __call__(self, name, shape, seed):
        if name == "token_embd.weight":
            return self.embedding().copy()
        if name == "output.weight":
            return self.output_head(shape)
        x = self.make_tensor(name, shape, seed)
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            x *= np.float32(RESIDUAL_SHRINK)
        return x
