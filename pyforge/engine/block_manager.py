"""Paged KV blocks: ref-counted, hash-chained prefix reuse, LRU free list.

A full block's hash covers its parent's hash and its own token ids, so equal
hashes mean equal prefixes; a hit is confirmed by comparing the tokens.
Free blocks keep their cached contents until reused (oldest freed first).
"""
from collections import OrderedDict


class BlockManager:
    def __init__(self, n_blocks, block_size):
        if n_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.ref_count = [0] * n_blocks
        self.block_key = [None] * n_blocks      # (hash, tokens) of a full cached block
        self.cached = {}                        # hash -> block id
        self.free = OrderedDict.fromkeys(range(n_blocks))  # LRU order: evict from the front
        self.prefix_queries = 0                 # prompt tokens looked up
        self.prefix_hits = 0                    # of those, found cached

    @property
    def num_free(self):
        return len(self.free)

    @property
    def usage(self):
        return 1.0 - len(self.free) / self.n_blocks

    def _take_free(self):
        block, _ = self.free.popitem(last=False)
        self._uncache(block)
        self.ref_count[block] = 1
        return block

    def _uncache(self, block):
        key = self.block_key[block]
        if key is not None:
            if self.cached.get(key[0]) == block:
                del self.cached[key[0]]
            self.block_key[block] = None

    def _ref(self, block):
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def extend_keys(self, token_ids, keys, n_full_blocks):
        """Append (hash, tokens) keys to `keys` until it covers n_full_blocks."""
        bs = self.block_size
        parent = keys[-1][0] if keys else None
        for i in range(len(keys), n_full_blocks):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = hash((parent, tokens))
            keys.append((parent, tokens))
        return keys

    def reuse_prefix(self, seq):
        """Attach cached blocks for the prompt's leading full blocks; returns tokens reused.

        The prompt's last token is always recomputed: its logits are needed."""
        n_full = (seq.num_prompt_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_prompt_tokens
        reused = 0
        for key in self.extend_keys(seq.token_ids, seq.block_keys, n_full):
            block = self.cached.get(key[0])
            if block is None or self.block_key[block] != key:
                break
            self._ref(block)
            seq.block_table.append(block)
            reused += self.block_size
        self.prefix_hits += reused
        return reused

    def blocks_needed(self, seq, n_tokens):
        need = -(-n_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq, n_tokens):
        return self.blocks_needed(seq, n_tokens) <= len(self.free)

    def allocate(self, seq, n_tokens):
        """Grow seq's block table to hold n_tokens tokens; False if blocks ran out."""
        if not self.can_allocate(seq, n_tokens):
            return False
        for _ in range(self.blocks_needed(seq, n_tokens)):
            seq.block_table.append(self._take_free())
        return True

    def register_full_blocks(self, seq):
        """Make the sequence's newly computed full blocks findable by later prompts."""
        n_full = seq.num_computed_tokens // self.block_size
        keys = self.extend_keys(seq.token_ids, seq.block_keys, n_full)
        for i in range(seq.num_registered_blocks, n_full):
            block, key = seq.block_table[i], keys[i]
            if self.block_key[block] is None and key[0] not in self.cached:
                self.block_key[block] = key
                self.cached[key[0]] = block
        seq.num_registered_blocks = max(seq.num_registered_blocks, n_full)

    def release(self, seq):
        """Drop seq's references; blocks nobody uses go to the LRU free list."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0
