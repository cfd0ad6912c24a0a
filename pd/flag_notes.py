"""What some ``pd-serve`` flags amount to here: the notes of the start-up log.

FastDeploy's command lines carry flags whose effect here is derived (one
``--pd-comm-port`` counted up over the DP ranks), partial (eight queue ports for four
DP ranks) or nothing at all (``--cache-queue-port``); each is accepted and said once
at start-up, never dropped in silence. Standard library only, like ``pd.args``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pd.dp_layout import RANK_PORT_FLAGS

if TYPE_CHECKING:
    from pd.args import ServeArgs


def flag_notes(args: ServeArgs) -> list[str]:
    """The lines the process that reads the flags logs before it starts anything."""
    notes = [note for dest in RANK_PORT_FLAGS if (note := args.rank_ports(dest).note)]
    if args.enable_expert_parallel:
        notes.append(
            "--enable-expert-parallel: MoE layers split whole experts over every DP x TP "
            "rank; a dense model has none, so there it changes nothing"
        )
    if any(args.cache_queue_ports):
        notes.append(
            "--cache-queue-port: nothing listens there; each DP rank's engine core reaches "
            "its TP workers over a channel of its own (a free port on 127.0.0.1)"
        )
    if args.splitwise_role == "prefill" and any(args.pd_comm_ports):
        notes.append(
            "--pd-comm-port: nothing listens there; a prefill rank calls its decode ranks' "
            "pd-comm services and serves none"
        )
    return notes
