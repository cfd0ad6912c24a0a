"""What an instance and the router say to each other, written down once (both sides
import it): the registration an API server sends at start-up and as its heartbeat, and
the router's answer. JSON over HTTP, like the rest of the router's surface.

    POST /router/register   Authorization: Bearer <bearer_token(secret, "router")>
    {"role": "mixed", "url": "http://10.0.0.5:8000", "model_names": ["m"], "dp_rank": 0,
     "model_digest": "3f0c...", "max_model_len": 4096, "num_open": 3, "num_waiting": 1}
    -> 200 {"heartbeat_s": 1.0}  (send it again that often)
    -> 401 without the cluster secret's token, 409 when it conflicts with what the
       router serves, 400 when malformed.

The heartbeat is the registration itself, so a restarted router learns every instance
back on their next heartbeat. A stopping instance sends a last one with ``is_draining``.

Prefill/decode pairs (``pd-router --splitwise``, no Redis). A prefill or decode
instance also lists its engine ranks (``pd_ranks``: each a base64 ``pd.cluster.
InstanceRecord``, one per DP rank behind the API server: pd-comm address, transfer
protocols, KV layout). The router picks a prefill instance and a decode instance per
request, picks one of the decode instance's ranks, and forwards the request to the
prefill instance with that rank's record in ``x-pd-decode-rank`` and, when the cluster
has a secret, ``x-pd-pair-token: <pair_token(secret, record)>``: an HMAC of that very
record, so a token seen on the wire pairs nothing but the same rank again. The prefill
instance refuses a pairing without the token (401) or with a record that is not a
decode rank's (400); it reserves, writes the KV and commits on that decode rank as in
the Redis path, and streams the answer back to the router.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cache_transfer.auth import derive_key

REGISTER_PATH = "/router/register"
TOKEN_PURPOSE = "router"  # the cluster secret's derived key for registration
ROLES = ("mixed", "prefill", "decode")
DECODE_RANK_HEADER = "x-pd-decode-rank"  # base64 InstanceRecord of the paired decode rank
PAIR_TOKEN_HEADER = "x-pd-pair-token"
PAIR_TOKEN_PURPOSE = "router-pair"  # the cluster secret's derived key for pairings
MAX_PD_RANKS = 256
MAX_RECORD_CHARS = 8192  # one base64 InstanceRecord


def pair_token(secret: bytes, decode_record: str) -> str:
    """The token of a pairing with ``decode_record`` (the header's value)."""
    key = derive_key(secret, PAIR_TOKEN_PURPOSE)
    return hmac.new(key, decode_record.encode(), hashlib.sha256).hexdigest()


def check_pair_token(secret: bytes, decode_record: str, presented: str | None) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented, pair_token(secret, decode_record))


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["mixed", "prefill", "decode"]
    url: str = Field(pattern=r"^https?://[^/\s]+$")  # the API server's root, no path
    model_names: list[str] = Field(min_length=1)
    dp_rank: int = Field(ge=0)
    model_digest: str = Field(min_length=1, max_length=128)
    max_model_len: int = Field(ge=0)
    num_open: int = Field(ge=0)  # requests open at this API server
    num_waiting: int = Field(ge=0)  # of those, not started yet
    is_draining: bool = False  # stopping: it finishes what it has and takes nothing new
    # prefill/decode instances: one base64 InstanceRecord per engine rank (see above)
    pd_ranks: list[Annotated[str, Field(max_length=MAX_RECORD_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PD_RANKS
    )


class RegistrationReply(BaseModel):
    heartbeat_s: float
