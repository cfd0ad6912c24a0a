"""The worker's persistent batch: each request's tokens and block table live in a row
of host arrays across steps, and a step's model inputs are built from those rows.

A plan only adds rows (new requests), appends blocks and sampled tokens to rows, or
frees rows; nothing is rebuilt from Python lists. A step then takes its rows in
plan order and derives, with numpy on the host, the flat token batch::

    rows      r0 (3 new tokens, 5 computed)   r1 (1 new token, 9 computed)
    tokens    t5 t6 t7                        t9          input_ids, positions 5 6 7 9
    query_start_loc  [0, 3, 4]    seq_lens [8, 10]    slot = table[p // bs] * bs + p % bs

and moves it to the device with two copies (one int32 buffer, one int64 buffer)
from pinned staging memory, so the host never waits for the device here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepInputs:
    """One step's model inputs on the device (views into the batch's device buffers,
    valid until the next step)."""

    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, M] int32, M = blocks of the longest context
    logits_index: torch.Tensor  # [S] int64: token index of each sampling row
    slot_mapping: torch.Tensor  # [T] int64
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    # Decode-only steps: input_ids, positions and seq_lens stacked [3, B] (one view, so
    # a CUDA graph takes them with one copy).
    decode_rows: torch.Tensor | None = None
    # Async scheduling: per row, where its last input token is in the previous step's
    # sampled tokens (-1: known on the host, already in input_ids).
    pending_src: torch.Tensor | None = None


class InputBatch:
    def __init__(
        self, max_num_reqs: int, max_model_len: int, block_size: int, device: torch.device
    ):
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, self.max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        # Two host staging sets, used in turn: with async scheduling the device may
        # still have to copy the previous step's inputs while this step's are written.
        self._staging: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._flip = 0

    # -- rows ------------------------------------------------------------------------

    def add(self, token_ids: list[int], block_ids: list[int], num_computed: int) -> int:
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        num_tokens = len(token_ids)
        self.token_ids[row, :num_tokens] = token_ids
        self.num_tokens[row] = num_tokens
        self.num_computed[row] = num_computed
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)
        return row

    def remove(self, row: int) -> None:
        self._free_rows.append(row)

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        end = start + len(block_ids)
        if end > self.max_blocks:
            raise ValueError(f"{end} blocks exceed a max_model_len sequence ({self.max_blocks})")
        self.block_table[row, start:end] = block_ids
        self.num_blocks[row] = end

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """One sampled token per row (rows are distinct)."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def _grow(self) -> None:
        """More requests than max_num_seqs can be held (a decode rank adopts what prefill
        ranks send): double the rows."""
        old = self.num_tokens.shape[0]
        self.token_ids = np.concatenate([self.token_ids, np.zeros_like(self.token_ids)])
        self.num_tokens = np.concatenate([self.num_tokens, np.zeros_like(self.num_tokens)])
        self.num_computed = np.concatenate([self.num_computed, np.zeros_like(self.num_computed)])
        self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    # -- one step ----------------------------------------------------------------------

    def prepare(
        self,
        rows: np.ndarray,
        num_new: np.ndarray,
        sampling_rows: np.ndarray,
        pending_src: np.ndarray | None = None,
    ) -> StepInputs:
        """Inputs for computing ``num_new[i]`` tokens of row ``rows[i]`` after the ones
        already computed; ``sampling_rows`` index into ``rows``; ``pending_src`` (see
        StepInputs) is passed through to the device."""
        num_seqs = len(rows)
        starts = self.num_computed[rows]
        seq_lens = starts + num_new
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        max_query_len = int(num_new.max(initial=0))  # 0: a dummy batch (lockstep DP)
        if max_query_len == 1:
            token_rows, positions = rows, starts
        else:
            token_rows = np.repeat(rows, num_new)
            offsets = np.repeat(starts - query_start_loc[:-1], num_new)
            positions = offsets + np.arange(num_tokens, dtype=np.int32)
        input_ids = self.token_ids[token_rows, positions]
        size = self.block_size
        slot_mapping = self.block_table[token_rows, positions // size].astype(np.int64) * size
        slot_mapping += positions % size
        max_seq_len = int(seq_lens.max(initial=0))
        width = -(-max_seq_len // size)
        tables = self.block_table[rows, :width]
        logits_index = query_start_loc[1:][sampling_rows].astype(np.int64) - 1

        ints = [input_ids, positions, seq_lens, query_start_loc, tables.reshape(-1)]
        longs = [logits_index, slot_mapping]
        if pending_src is not None:
            longs.append(pending_src)
        self._flip ^= 1
        int_parts = self._to_device("int32", ints, np.int32)
        long_parts = self._to_device("int64", longs, np.int64)
        ids_t, positions_t, seq_lens_t, qsl_t, tables_t = int_parts
        logits_index_t, slot_mapping_t = long_parts[:2]
        return StepInputs(
            input_ids=ids_t,
            positions=positions_t,
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_table=tables_t.view(num_seqs, width),
            logits_index=logits_index_t,
            slot_mapping=slot_mapping_t,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            decode_rows=(
                ids_t.as_strided((3, num_seqs), (num_seqs, 1)) if max_query_len == 1 else None
            ),
            pending_src=long_parts[2] if pending_src is not None else None,
        )

    def _to_device(
        self, name: str, parts: list[np.ndarray], dtype: type[np.generic]
    ) -> list[torch.Tensor]:
        """Pack ``parts`` into one staging buffer and copy it to the device at once."""
        sizes = [part.size for part in parts]
        if self.device.type == "cpu":  # a fresh array: nothing to stage
            packed = np.concatenate(parts, dtype=dtype, casting="unsafe")
            return list(torch.from_numpy(packed).split(sizes))
        total = sum(sizes)
        host, device = self._buffers(name, total, dtype)
        np.concatenate(parts, out=host[:total].numpy(), casting="unsafe")
        out = device[:total]
        out.copy_(host[:total], non_blocking=True)
        return list(out.split(sizes))

    def _buffers(
        self, name: str, total: int, dtype: type[np.generic]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned host staging and device buffers of at least ``total`` elements, grown
        by doubling. NOTE: a pinned buffer is written again two steps later, when the
        step that copied from it has been read back (so has its copy)."""
        key = (name, self._flip)
        buffers = self._staging.get(key)
        if buffers is None or buffers[0].numel() < total:
            capacity = max(total, 2 * (buffers[0].numel() if buffers else 4096))
            torch_dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
            host = torch.empty(capacity, dtype=torch_dtype, pin_memory=True)
            device = torch.empty(capacity, dtype=torch_dtype, device=self.device)
            buffers = self._staging[key] = (host, device)
        return buffers
