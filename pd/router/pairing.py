"""Prefill/decode pairs (``pd-router --splitwise``): the engine ranks a prefill or
decode instance lists when it registers, checked once per beat, and the headers that
pair a request's prefill instance with one rank of its decode instance (``wire.py``
has the contract)."""

from __future__ import annotations

import base64
import random

from google.protobuf.message import DecodeError

from pd.router.wire import DECODE_RANK_HEADER, PAIR_TOKEN_HEADER, Registration, pair_token
from proto import cluster_pb2


def check_pd_ranks(registration: Registration) -> None:
    """ValueError naming the first fault unless ``registration`` lists at least one
    engine rank and each is a base64 InstanceRecord of its role with a rank id."""
    role = registration.role
    if not registration.pd_ranks:
        raise ValueError(f"a {role} instance must list its engine ranks (pd_ranks)")
    for index, encoded in enumerate(registration.pd_ranks):
        try:
            rank = cluster_pb2.InstanceRecord.FromString(base64.b64decode(encoded, validate=True))
        except (ValueError, DecodeError) as error:  # binascii.Error is a ValueError
            raise ValueError(f"pd_ranks[{index}] is not a base64 InstanceRecord: "
                             f"{error}") from None  # fmt: skip
        if rank.role != role:
            raise ValueError(f"pd_ranks[{index}] is the record of a {rank.role or 'role-less'}"
                             f" rank, not of a {role} rank")  # fmt: skip
        if not rank.rank_id:
            raise ValueError(f"pd_ranks[{index}] has no rank_id")


def pair_headers(decode: Registration, secret: bytes | None, rng: random.Random) -> dict[str, str]:
    """The headers that send a request's decode to one of ``decode``'s engine ranks
    (at random), with the pairing's token when the cluster has a ``secret``."""
    record = rng.choice(decode.pd_ranks)
    headers = {DECODE_RANK_HEADER: record}
    if secret is not None:
        headers[PAIR_TOKEN_HEADER] = pair_token(secret, record)
    return headers
