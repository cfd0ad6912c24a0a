"""Vocab-parallel embedding and LM head: each TP rank holds a slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import ParallelGroup
from engine.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.tp_rank = tp.rank
        self.tp_size = tp.size
        self.num_embeddings = num_embeddings
        # The last rank's slice is padded so that every rank has the same size.
        self.num_local = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = min(self.num_local, loaded.size(0) - self.vocab_start)
        param.data.zero_()
        param.data[:size].copy_(loaded.narrow(0, self.vocab_start, size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        in_range = (local_ids >= 0) & (local_ids < self.num_local)
        out = F.embedding(local_ids.clamp(0, self.num_local - 1), self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocab."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.num_embeddings]
