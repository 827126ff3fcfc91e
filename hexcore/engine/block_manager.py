"""Hands out the fixed-size KV-cache blocks of one replica (block ids are the same on all its ranks).

With prefix caching, a full block whose keys and values have been computed is registered under a
hash of its tokens and of every token before it. A new sequence whose prompt starts with registered
blocks shares them (reference counts) instead of computing them again. A block nobody holds goes
back to the free list but keeps its contents and its hash until it is handed out again, oldest
first, so recently used prefixes survive longest.
"""

from __future__ import annotations

from collections import OrderedDict

from hexcore.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> hash, for blocks with registered contents
        self._block_of: dict[int, int] = {}  # hash -> block id
        self.num_cache_hits = 0  # blocks reused instead of computed
        self._freed_seq_ids: list[int] = []  # since the last take_freed_seq_ids()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens with the blocks still free."""
        return self.num_blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table)
        assert num_new <= len(self._free), "grow() without can_grow()"
        for _ in range(max(0, num_new)):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        if seq.block_table:
            self._freed_seq_ids.append(seq.seq_id)
        for block in reversed(seq.block_table):  # the tail of a prefix is evicted before its head
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def take_freed_seq_ids(self) -> list[int]:
        """The sequences whose tables were freed since the last call (finished, aborted, preempted,
        unadmitted): the replica's workers drop what they keep of them."""
        freed, self._freed_seq_ids = self._freed_seq_ids, []
        return freed

    # prefix caching
    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence with nothing computed the registered blocks its prompt starts with.
        At least the prompt's last token is left to compute: its logits give the first output token."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        parent = None
        for index in range((seq.num_prompt_tokens - 1) // self.block_size):
            block_hash = self._hash(parent, seq.prompt_token_ids, index)
            block = self._block_of.get(block_hash)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
            parent = block_hash
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.num_cache_hits += len(seq.block_table)
        if seq.num_cached_tokens is None:  # what its request reports: the first admission's hits
            seq.num_cached_tokens = seq.num_computed_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose keys and values are now in the cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        tokens = None
        for index in range(len(seq.block_hashes), num_full):
            tokens = tokens or seq.token_ids(0, num_full * self.block_size)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = self._hash(parent, tokens, index)
            seq.block_hashes.append(block_hash)
            block = seq.block_table[index]
            if block_hash not in self._block_of and block not in self._hash_of:
                self._block_of[block_hash] = block
                self._hash_of[block] = block_hash

    def _hash(self, parent: int | None, tokens: list[int], index: int) -> int:
        return hash((parent, tuple(tokens[index * self.block_size : (index + 1) * self.block_size])))

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
