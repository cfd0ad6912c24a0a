"""Peer authentication with the cluster secret (DESIGN.md "Trust inside the cluster").

Nothing here sends the secret itself. Each use gets its own key derived from it
(``derive_key``), so a token seen on one channel is worth nothing on another:

- pd-comm (gRPC): every call carries ``derive_key(secret, "pd-comm")`` as a bearer
  token in its metadata (``PD_AUTH_HEADER``); a call without it is refused
  UNAUTHENTICATED before any handler runs.
- Stream transports (tcp KV streams, rdma's QP exchange, the CUDA ipc pull service,
  which also checks the peer's uid): challenge-response at connect. The receiver
  sends a random nonce; the sender answers HMAC(key, nonce) and a random session id;
  a wrong answer closes the connection before a frame is read.

A rank without a secret runs as before (tests, single-host experiments); the secret
is cluster-wide, so a peer with the wrong one, or none, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct

PD_AUTH_HEADER = "x-pd-auth"
NONCE_BYTES = 16
SESSION_BYTES = 16
_MAC_BYTES = 32


class AuthError(ConnectionError):
    """A peer did not prove it holds the cluster secret."""


def derive_key(secret: bytes, purpose: str) -> bytes:
    """The key of one use of the cluster secret (HMAC-SHA256 of the purpose's name)."""
    return hmac.new(secret, f"pd-serve {purpose}".encode(), hashlib.sha256).digest()


def bearer_token(secret: bytes, purpose: str) -> str:
    return derive_key(secret, purpose).hex()


def check_token(secret: bytes, purpose: str, presented: str | bytes | None) -> bool:
    if presented is None:
        return False
    if isinstance(presented, bytes):
        presented = presented.decode(errors="replace")
    return hmac.compare_digest(presented, bearer_token(secret, purpose))


def check_same_user(sock: socket.socket) -> None:
    """AuthError unless the process at the other end of a Unix socket runs as our user
    (SO_PEERCRED: the kernel's word, not the peer's)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise AuthError(f"a process of uid {uid} is not this user's")


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise AuthError("peer closed the connection during authentication")
        data += chunk
    return bytes(data)


def challenge(sock: socket.socket, secret: bytes, purpose: str) -> bytes:
    """Receiver side: the peer's session id once it proved the secret; AuthError if not."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(nonce)
    answer = _recv_exact(sock, _MAC_BYTES + SESSION_BYTES)
    mac, session = answer[:_MAC_BYTES], answer[_MAC_BYTES:]
    expected = hmac.new(derive_key(secret, purpose), nonce + session, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise AuthError("the peer does not hold the cluster secret")
    return session


def respond(sock: socket.socket, secret: bytes, purpose: str, session: bytes) -> None:
    """Sender side: answer the receiver's challenge for ``session``."""
    nonce = _recv_exact(sock, NONCE_BYTES)
    mac = hmac.new(derive_key(secret, purpose), nonce + session, hashlib.sha256).digest()
    sock.sendall(mac + session)
