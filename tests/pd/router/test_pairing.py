"""Prefill/decode pairs without processes: the engine ranks a registration lists,
checked; the pairing headers; a --splitwise router's picks, one policy per role."""

from __future__ import annotations

import base64
import random
import re
from collections import Counter

import pytest

from pd.router.app import Router
from pd.router.config import RouterConfig
from pd.router.pairing import check_pd_ranks, pair_headers
from pd.router.wire import DECODE_RANK_HEADER, PAIR_TOKEN_HEADER, Registration, check_pair_token
from proto import cluster_pb2


def rank(role: str = "decode", rank_id: str = "d.dp0") -> str:
    record = cluster_pb2.InstanceRecord(rank_id=rank_id, role=role, host="127.0.0.1",
                                        pd_comm_port=7000)  # fmt: skip
    return base64.b64encode(record.SerializeToString()).decode()


def registration(url: str, role: str = "decode", pd_ranks: list[str] | None = None
                 ) -> Registration:  # fmt: skip
    return Registration(role=role, url=url, model_names=["m"], dp_rank=0, model_digest="d1",
                        max_model_len=256, num_open=0, num_waiting=0,
                        pd_ranks=[rank(role)] if pd_ranks is None else pd_ranks)  # fmt: skip


@pytest.mark.parametrize(("pd_ranks", "message"), [
    ([], "a decode instance must list its engine ranks"),
    (["not base64!"], "pd_ranks[0] is not a base64 InstanceRecord"),
    ([base64.b64encode(b"\xff\xff").decode()], "pd_ranks[0] is not a base64 InstanceRecord"),
    ([rank("prefill")], "pd_ranks[0] is the record of a prefill rank, not of a decode rank"),
    ([rank(), rank(rank_id="")], "pd_ranks[1] has no rank_id"),
])  # fmt: skip
def test_engine_ranks_are_checked_and_the_fault_named(pd_ranks, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_pd_ranks(registration("http://d:1", pd_ranks=pd_ranks))
    check_pd_ranks(registration("http://d:1", pd_ranks=[rank(), rank(rank_id="d.dp1")]))


def test_pair_headers_name_a_rank_at_random_and_carry_the_token():
    ranks = [rank(rank_id="d.dp0"), rank(rank_id="d.dp1")]
    decode = registration("http://d:1", pd_ranks=ranks)
    rng = random.Random(0)
    secret = b"a-cluster-secret-of-32-bytes...."
    seen = Counter(pair_headers(decode, secret, rng)[DECODE_RANK_HEADER] for _ in range(200))
    assert set(seen) == set(ranks) and min(seen.values()) > 60, seen
    headers = pair_headers(decode, secret, rng)
    # the token is bound to the rank it pairs with: it proves nothing for another one
    record, token = headers[DECODE_RANK_HEADER], headers[PAIR_TOKEN_HEADER]
    assert check_pair_token(secret, record, token)
    other = next(r for r in ranks if r != record)
    assert not check_pair_token(secret, other, token)
    assert not check_pair_token(b"another-secret-of-32-bytes......", record, token)
    assert PAIR_TOKEN_HEADER not in pair_headers(decode, None, rng)


def test_splitwise_picks_each_role_with_its_own_policy():
    secret = b"a-cluster-secret-of-32-bytes...."
    config = RouterConfig(splitwise=True, prefill_policy="cache_aware",
                          decode_policy="round_robin", cluster_secret=secret)  # fmt: skip
    router = Router(config, random.Random(0))
    assert router.roles == ("prefill", "decode")
    for url, role in [("http://p:1", "prefill"), ("http://p:2", "prefill"),
                      ("http://d:1", "decode"), ("http://d:2", "decode")]:  # fmt: skip
        router.registry.register(registration(url, role))
    system = "You are a terse assistant who answers in one word. "
    questions = ["sky?", "grass?", "sea?", "snow?", "sun?", "rain?", "moon?", "fire?"]
    prefills = {router.pick("prefill", "m", system + q, set()).url for q in questions}  # type: ignore[union-attr]
    assert len(prefills) == 1  # the shared prefix keeps one prefill instance
    decodes = [router.pick("decode", "m", system + q, set()).url for q in questions[:4]]  # type: ignore[union-attr]
    assert decodes == ["http://d:1", "http://d:2"] * 2  # round_robin, untouched by it
    (only,) = prefills
    assert router.pick("prefill", "m", system, {only}).url != only  # type: ignore[union-attr]
    assert router.pick("decode", "other", system, set()) is None
