"""KV block accounting with prefix caching.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. A sequence's
``block_ids`` is its block table: token position p lives in block
``block_ids[p // block_size]`` at offset ``p % block_size``::

    tokens:  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9      (block_size 4)
    table:   [   b7      ,    b2       ,  b5  ]     slot(t9) = 5 * 4 + 1

A full block whose KV is computed gets a content hash chained over every
token before it, so equal prefixes map to equal hashes. Cached blocks are
shared by reference count; a block whose count drops to zero stays cached
in the free queue (least recently freed at the front) until it is reused
for something else, and only then loses its hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Content hash of one full block, chained to the hash of its prefix."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Blocks with ref count 0, in eviction order (front = evict first).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_hit_tokens = 0  # lifetime counters, for tests and metrics
        self.num_prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------

    def _update_hashes(self, seq: Sequence) -> None:
        """Extend ``seq.block_hashes`` to cover every full block of its tokens."""
        size = self.block_size
        for index in range(len(seq.block_hashes), seq.num_tokens // size):
            parent = seq.block_hashes[index - 1] if index else b""
            tokens = seq.token_ids[index * size : (index + 1) * size]
            seq.block_hashes.append(hash_block(parent, tokens))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the longest prefix of ``seq``'s full blocks.

        At least one token is always left to compute, so the model has a
        position to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # -- allocation ---------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether ``seq`` (holding no blocks) can start computing
        ``num_new_tokens`` tokens after its cached prefix."""
        hits = self.find_cached_prefix(seq)
        return self._num_missing(seq, hits, num_new_tokens) <= self._num_usable(hits)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give a waiting sequence its cached prefix plus blocks for
        ``num_new_tokens`` more; sets ``num_computed_tokens`` to the hit length."""
        if seq.block_ids:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        hits = self.find_cached_prefix(seq)
        num_missing = self._num_missing(seq, hits, num_new_tokens)
        if num_missing > self._num_usable(hits):
            raise RuntimeError(f"not enough free blocks for {seq.request_id}")
        for block_id in hits:
            self._take(block_id)
        seq.block_ids = hits + [self._take_free() for _ in range(num_missing)]
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_prefix_query_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += seq.num_computed_tokens

    def _num_missing(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> int:
        num_tokens = len(hits) * self.block_size + num_new_tokens
        return self.num_blocks_for(num_tokens) - len(hits)

    def _num_usable(self, hits: list[int]) -> int:
        # Hits sitting in the free queue leave it when taken, so they cannot
        # also serve as fresh blocks.
        return self.num_free_blocks - sum(1 for b in hits if self.ref_counts[b] == 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a running sequence can compute ``num_new_tokens`` more tokens."""
        return self._num_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        num_needed = self._num_to_append(seq, num_new_tokens)
        if num_needed > self.num_free_blocks:
            raise RuntimeError(f"not enough free blocks to extend {seq.request_id}")
        seq.block_ids.extend(self._take_free() for _ in range(num_needed))

    def _num_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_ids))

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of ``seq``'s blocks whose KV is now fully computed."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq)
        # NOTE: blocks holding a pending token (async scheduling) wait for its value.
        num_full = min(
            seq.num_computed_tokens // self.block_size, len(seq.block_ids), len(seq.block_hashes)
        )
        for index in range(num_full):
            block_id = seq.block_ids[index]
            if self.block_hash[block_id] is not None:
                continue
            block_hash = seq.block_hashes[index]
            # Two sequences may compute the same content at once: the first
            # block published wins; the other stays private and unhashed.
            if block_hash not in self.cached:
                self.cached[block_hash] = block_id
                self.block_hash[block_id] = block_hash

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Later blocks are freed first so that, under
        LRU eviction, a prefix outlives its continuations."""
        self.free_blocks(seq.block_ids)
        seq.block_ids = []

    def allocate_blocks(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` fresh blocks for KV computed elsewhere (a prefill rank writes
        them), or None when too few are free. Never prefix-cache hits: their content is
        not known yet."""
        if num_blocks > self.num_free_blocks:
            return None
        return [self._take_free() for _ in range(num_blocks)]

    def free_blocks(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hash[block_id]
        if old_hash is not None:  # evict: its content is about to be overwritten
            del self.cached[old_hash]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self.cached.items()):
            if self.ref_counts[block_id] == 0:
                del self.cached[block_hash]
                self.block_hash[block_id] = None

    # -- integrity ----------------------------------------------------------

    def check_invariants(self, live: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the accounting is inconsistent.

        With ``live`` (every sequence holding blocks), reference counts must
        equal the number of block tables naming each block.
        """
        for block_id, count in enumerate(self.ref_counts):
            _require(count >= 0, f"block {block_id} has ref count {count}")
            _require(
                (count == 0) == (block_id in self.free_queue),
                f"block {block_id}: ref count {count} but in_free_queue="
                f"{block_id in self.free_queue}",
            )
        for block_hash, block_id in self.cached.items():
            _require(self.block_hash[block_id] == block_hash, f"hash map wrong for {block_id}")
        num_hashed = sum(h is not None for h in self.block_hash)
        _require(num_hashed == len(self.cached), "hashed blocks and hash map differ in size")
        if live is not None:
            expected = [0] * self.num_blocks
            for seq in live:
                _require(len(set(seq.block_ids)) == len(seq.block_ids), f"{seq} repeats a block")
                for block_id in seq.block_ids:
                    expected[block_id] += 1
            _require(expected == self.ref_counts, "ref counts differ from live block tables")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
