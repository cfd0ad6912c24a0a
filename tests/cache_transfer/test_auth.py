"""The cluster secret's challenge-response (tcp KV streams, rdma's QP exchange, the CUDA
ipc pull service) and its per-use keys, on real sockets."""

from __future__ import annotations

import socket
import threading

import pytest

from cache_transfer.auth import (
    AuthError,
    bearer_token,
    challenge,
    check_same_user,
    check_token,
    respond,
)

SECRET = b"0123456789abcdef-secret"


def handshake(receiver_secret: bytes, sender_secret: bytes, purposes=("kv", "kv")):  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    with a, b:
        answered = threading.Thread(
            target=lambda: respond(b, sender_secret, purposes[1], b"S" * 16), daemon=True
        )
        answered.start()
        try:
            return challenge(a, receiver_secret, purposes[0])
        finally:
            answered.join(timeout=5)


def test_a_peer_with_the_secret_is_admitted_with_its_session() -> None:
    assert handshake(SECRET, SECRET) == b"S" * 16


def test_a_wrong_secret_or_another_use_of_the_right_one_is_refused() -> None:
    with pytest.raises(AuthError, match="does not hold the cluster secret"):
        handshake(SECRET, b"another-secret-of-16+")
    with pytest.raises(AuthError):  # a proof made for one channel is worth nothing on another
        handshake(SECRET, SECRET, purposes=("kv-tcp", "rdma-qp"))


def test_a_peer_that_closes_during_the_challenge_is_refused() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises((AuthError, OSError)):
            challenge(a, SECRET, "kv")


def test_tokens_are_per_use_and_never_the_secret() -> None:
    token = bearer_token(SECRET, "pd-comm")
    assert SECRET.hex() not in token and token != bearer_token(SECRET, "redis")
    assert check_token(SECRET, "pd-comm", token)
    assert not check_token(SECRET, "pd-comm", bearer_token(b"x" * 16, "pd-comm"))
    assert not check_token(SECRET, "pd-comm", None)


def test_unix_socket_peers_of_this_user_pass_the_uid_check() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        check_same_user(a)
