"""Turn one scheduler step into model inputs and attention metadata.

The scheduled sequences' new tokens are flattened into one batch of T tokens
(sequence by sequence). Everything per-token or per-context is computed with
tensor ops on the target device from a few per-sequence vectors, so the cost
on the host grows with the number of sequences, not with context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.forward_context import AttentionMetadata
from engine.scheduler import ScheduledSequence


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sampling_rows: list[int]  # index into the scheduled list of each sampled row


def build_model_inputs(
    scheduled: list[ScheduledSequence], block_size: int, device: torch.device
) -> ModelInputs:
    input_ids: list[int] = []
    for item in scheduled:
        start = item.seq.num_computed_tokens
        input_ids.extend(item.seq.token_ids[start : start + item.num_new_tokens])
    max_blocks = max(len(item.seq.block_ids) for item in scheduled)
    tables: list[int] = []
    for item in scheduled:
        tables.extend(item.seq.block_ids)
        tables.extend([0] * (max_blocks - len(item.seq.block_ids)))
    sampling_rows = [i for i, item in enumerate(scheduled) if item.samples]
    starts = [item.seq.num_computed_tokens for item in scheduled]
    q_lens = [item.num_new_tokens for item in scheduled]
    # One host-to-device copy for all of the step's vectors, sliced on the device.
    parts = _to_device([input_ids, starts, q_lens, sampling_rows, tables], device)
    input_ids_t, starts_t, q_lens_t, sampling_rows_t, tables_t = parts
    sizes = (
        len(input_ids),
        max(q_lens),
        max(start + q_len for start, q_len in zip(starts, q_lens, strict=True)),
    )
    metadata, positions = _attention_metadata(
        starts_t,
        q_lens_t,
        tables_t.view(len(scheduled), max_blocks),
        block_size,
        sampling_rows_t,
        sizes,
    )
    return ModelInputs(input_ids_t, positions, metadata, sampling_rows)


def _to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    return list(packed.split([len(part) for part in parts]))


def _slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of ``positions`` ([B, N] token positions) under each row's table."""
    blocks = block_tables.gather(1, positions // block_size)
    return blocks * block_size + positions % block_size


def _attention_metadata(
    starts: torch.Tensor,
    q_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    sampling_rows: torch.Tensor,
    sizes: tuple[int, int, int],
) -> tuple[AttentionMetadata, torch.Tensor]:
    device = starts.device
    num_seqs = starts.numel()
    num_tokens, max_q, max_ctx = sizes  # from the host: reading them off the device would sync
    q_offsets = torch.cumsum(q_lens, 0) - q_lens  # first token index of each sequence

    # Per-token view: which sequence and which position within its chunk.
    seq_of_token = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens
    )
    local = torch.arange(num_tokens, device=device) - q_offsets[seq_of_token]
    positions = starts[seq_of_token] + local  # [T]
    token_tables = block_tables[seq_of_token]
    slot_mapping = _slots(token_tables, positions.unsqueeze(1), block_size).squeeze(1)

    # Padded [B, Q] query rows and [B, C] context columns.
    row = torch.arange(max_q, device=device).unsqueeze(0)  # [1, Q]
    valid_q = row < q_lens.unsqueeze(1)  # [B, Q]
    query_index = q_offsets.unsqueeze(1) + torch.where(valid_q, row, 0)
    col = torch.arange(max_ctx, device=device).unsqueeze(0)  # [1, C]
    ctx_lens = (starts + q_lens).unsqueeze(1)
    # Columns past a sequence's context read its position 0 (masked anyway).
    key_positions = torch.where(col < ctx_lens, col, 0).expand(num_seqs, max_ctx)
    key_slots = _slots(block_tables, key_positions, block_size)
    q_positions = starts.unsqueeze(1) + row  # [B, Q]
    causal = col.unsqueeze(1) <= q_positions.unsqueeze(2)  # [B, Q, C]
    # Padding rows attend to column 0 only, so softmax never sees an empty row.
    pad_rows = (~valid_q).unsqueeze(2) & (col.unsqueeze(1) == 0)
    attn_mask = torch.where(valid_q.unsqueeze(2), causal, pad_rows).unsqueeze(1)

    output_index = seq_of_token * max_q + local
    logits_index = (q_offsets + q_lens - 1)[sampling_rows]
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_index=query_index,
        key_slots=key_slots,
        attn_mask=attn_mask,
        output_index=output_index,
        logits_index=logits_index,
    )
    return metadata, positions
