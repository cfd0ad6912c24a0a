"""Who this ``pd-serve`` instance is in a splitwise cluster: its ids, the address peers
reach it at, and the settings its engine rank registers with."""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass

from pd.args import ServeArgs
from pd.rank.settings import RankSettings

logger = logging.getLogger("pd.serve")

_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class ClusterInstance:
    instance_id: str
    api_id: str  # names this API server's result channel
    rank_settings: list[RankSettings]  # one per local DP rank, each registered on its own


def advertised_host(bind_host: str) -> str:
    """The address other instances use for pd-comm and KV transfers: the bound address,
    or this host's name resolved when binding every interface."""
    if bind_host not in _WILDCARDS:
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def cluster_instance(args: ServeArgs, api_port: int) -> ClusterInstance:
    from cache_transfer.protocols import usable_protocols

    host = advertised_host(args.host)
    instance_id = re.sub(r"[^A-Za-z0-9._-]", "_", f"{args.splitwise_role}-{host}-{api_port}")
    protocols, _ = usable_protocols(args.cache_transfer_protocols)  # logs what it drops
    if args.splitwise_role != "mixed":
        logger.info("KV transfer protocols offered: %s", ",".join(protocols))
    pd_comm = args.rank_ports("pd_comm_ports")
    rdma = args.rank_ports("rdma_comm_ports")
    model = args.served_model_name[0] if args.served_model_name else args.model
    settings = [
        RankSettings(
            role=args.splitwise_role,
            rank_id=f"{instance_id}.dp{dp_rank}",
            host=host,
            model=model,
            scheduler=args.scheduler_config(),
            protocols=protocols,
            api_port=api_port,
            pd_comm_port=pd_comm.per_rank[index][0],
            rdma_comm_ports=rdma.per_rank[index],
            secret=args.cluster_secret(),
            paired_by_router=args.paired_by_router,
        )
        for index, dp_rank in enumerate(args.dp_layout.ranks)
    ]
    return ClusterInstance(instance_id, f"api-{instance_id}", settings)
