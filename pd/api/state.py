"""What the API server's handlers share: flags, tokenizer, engine client, metrics."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pd.args import ServeArgs
from pd.metrics import ServerMetrics

if TYPE_CHECKING:
    from pd.engine_client import EngineClient, RequestTimings


@dataclass
class ServerState:
    args: ServeArgs
    tokenizer: Any
    model_names: list[str]
    metrics: ServerMetrics
    engine: EngineClient | None = None
    max_model_len: int = 0

    @classmethod
    def create(cls, args: ServeArgs, tokenizer: Any) -> ServerState:
        names = list(args.served_model_name or [args.model])
        metrics = ServerMetrics(names[0], dp_ranks=tuple(args.dp_layout.ranks))
        return cls(args=args, tokenizer=tokenizer, model_names=names, metrics=metrics)

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token decodes to (twice the longest
        vocabulary entry, for normalizers), so that a text of more than
        ``max_model_len * max_chars_per_token`` characters is surely too long."""
        return 2 * max(len(piece) for piece in self.tokenizer.get_vocab())

    @property
    def max_body_bytes(self) -> int | None:
        """The largest request body a request this model can serve needs (None until
        the engine reports max_model_len): a prompt of at most
        ``max_model_len * max_chars_per_token`` characters, each at most 6 bytes when
        JSON-escaped, plus 1 MiB for every other field. Bodies beyond it are refused
        unparsed: JSON validation holds the GIL, so parsing megabytes of token ids would
        stall every other request even on a worker thread."""
        if not self.max_model_len:
            return None
        return (1 << 20) + 6 * self.max_model_len * self.max_chars_per_token

    def timings(self) -> RequestTimings:
        from pd.engine_client import RequestTimings

        return RequestTimings(
            on_first_token=self.metrics.observe_first_token,
            on_inter_token=self.metrics.observe_inter_token,
            on_finished=self.metrics.observe_finished,
            on_stats=self.metrics.set_engine_stats,
            on_kv_events=self.metrics.observe_kv_events,
            on_workers=self.metrics.set_tp_workers,
            on_engine_totals=self.metrics.set_engine_totals,
            on_rank_up=self.metrics.set_dp_rank_up,
            on_prefix_cache=self.metrics.observe_prefix_cache,
        )
