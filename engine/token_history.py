"""What the penalties read, kept per batch row on the device.

``seen[row, token]``: the token is in the request's prompt or output (repetition
penalty); ``counts[row, token]``: how often it is in the output (frequency and
presence penalties). A row is filled once when its request joins the worker and each
sampled token is recorded on the device, so a step neither rebuilds these from the
host's token lists nor reads anything back. Only requests with a penalty use a row;
the tensors ([rows, vocab] bool and float32) are allocated when the first one comes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampler import PenaltyTensors, penalty_values, to_device
from engine.sampling_params import SamplingParams


class TokenHistory:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.seen: torch.Tensor | None = None  # [rows, V] bool
        self.counts: torch.Tensor | None = None  # [rows, V] float32

    def fill(self, row: int, prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        self._ensure_rows(row + 1)
        assert self.seen is not None and self.counts is not None
        self.seen[row].zero_()
        self.counts[row].zero_()
        for token_ids in (prompt_token_ids, output_token_ids):
            if token_ids:
                self.seen[row, self._ids(token_ids)] = True
        if output_token_ids:
            outputs = self._ids(output_token_ids)
            self.counts[row].index_add_(0, outputs, torch.ones_like(outputs, dtype=torch.float32))

    def record(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """One sampled token per row (rows distinct, on the device)."""
        if self.seen is None or self.counts is None:
            return
        self.seen[rows, token_ids] = True
        self.counts.index_put_((rows, token_ids), torch.ones_like(rows, dtype=torch.float32), True)

    def penalties(self, params: Sequence[SamplingParams], rows: list[int]) -> PenaltyTensors | None:
        """The penalty inputs of the sampling rows ``rows`` (one per params). Rows of
        requests without a penalty read whatever their row holds: their factors are
        neutral (1 and 0), so it changes nothing."""
        rep, pres, freq = penalty_values(params)
        if rep is None and pres is None and freq is None:
            return None
        self._ensure_rows(max(rows) + 1)
        assert self.seen is not None and self.counts is not None
        index = self._ids(rows)

        def values(v: list[float] | None) -> torch.Tensor | None:
            return (
                None if v is None else to_device(torch.tensor(v, dtype=torch.float32), self.device)
            )

        return PenaltyTensors(
            seen_mask=None if rep is None else self.seen.index_select(0, index),
            output_counts=None if pres is None and freq is None else self.counts[index],
            repetition_penalties=values(rep),
            presence_penalties=values(pres),
            frequency_penalties=values(freq),
        )

    def _ids(self, token_ids: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(token_ids, dtype=torch.int64), self.device)

    def _ensure_rows(self, num_rows: int) -> None:
        have = 0 if self.seen is None else self.seen.shape[0]
        if num_rows <= have:
            return
        rows = max(num_rows, 2 * have, 8)
        seen = torch.zeros((rows, self.vocab_size), dtype=torch.bool, device=self.device)
        counts = torch.zeros((rows, self.vocab_size), dtype=torch.float32, device=self.device)
        if self.seen is not None and self.counts is not None:
            seen[:have] = self.seen
            counts[:have] = self.counts
        self.seen, self.counts = seen, counts
