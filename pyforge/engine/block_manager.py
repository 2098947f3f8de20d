"""Paged KV blocks: ref-counted, hash-chained prefix reuse, LRU free list.

A full block's hash covers its parent's hash and its own token ids; a hit is
confirmed by comparing the parent hash and the tokens. Free blocks keep their
cached contents until reused (oldest freed first).

The integer state (ref counts, the intrusive LRU free list, the hash -> block
map, each cached block's tokens) lives in `pyforge.native.block_pool.BlockPool`;
this class maps Sequences (Python block tables, token lists) onto it.
"""
from pyforge.native.block_pool import BlockPool


class BlockManager:
    def __init__(self, n_blocks, block_size, prefix_caching=True):
        self.pool = BlockPool(n_blocks, block_size)   # rejects sizes < 1
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching    # off: no block is ever registered, so none is found
        self.prefix_queries = 0                 # prompt tokens looked up
        self.prefix_hits = 0                    # of those, found cached

    @property
    def ref_count(self):
        """int32 [n_blocks], read-only."""
        return self.pool.ref_count

    @property
    def num_free(self):
        return self.pool.num_free

    @property
    def usage(self):
        return 1.0 - self.pool.num_free / self.n_blocks

    def extend_keys(self, token_ids, keys, n_full_blocks):
        """Append chained block hashes (ints) to `keys` until it covers n_full_blocks."""
        done = len(keys)
        if done < n_full_blocks:
            keys.extend(self.pool.hash_blocks(token_ids, done, n_full_blocks, keys[-1] if keys else 0))
        return keys

    def reuse_prefix(self, seq):
        """Attach cached blocks for the prompt's leading full blocks; returns tokens reused.

        The prompt's last token is always recomputed: its logits are needed."""
        n_full = (seq.num_prompt_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_prompt_tokens
        keys = self.extend_keys(seq.token_ids, seq.block_keys, n_full)
        if not keys:
            return 0
        blocks = self.pool.match_prefix(seq.token_ids, keys)
        seq.block_table.extend(blocks)
        reused = len(blocks) * self.block_size
        self.prefix_hits += reused
        return reused

    def blocks_needed(self, seq, n_tokens):
        need = -(-n_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def allocate(self, seq, n_tokens):
        """Grow seq's block table to hold n_tokens tokens; False if blocks ran out."""
        need = self.blocks_needed(seq, n_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            seq.block_table.extend(self.pool.allocate(need))
        return True

    def register_full_blocks(self, seq):
        """Make the sequence's newly computed full blocks findable by later prompts."""
        start, n_full = seq.num_registered_blocks, seq.num_computed_tokens // self.block_size
        if n_full <= start or not self.prefix_caching:
            return
        keys = self.extend_keys(seq.token_ids, seq.block_keys, n_full)
        self.pool.register(seq.block_table, seq.token_ids, keys, start, n_full)
        seq.num_registered_blocks = n_full

    def trim(self, seq):
        """Free the blocks past seq's tokens: those only rejected drafts wrote to
        (speculative decoding). They were never registered: only computed full blocks are."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.pool.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def release(self, seq):
        """Drop seq's references; blocks nobody uses go to the LRU free list."""
        if seq.block_table:
            self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
