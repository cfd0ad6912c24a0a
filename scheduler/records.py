"""Encoding of the records that travel through Redis queues and channels; anything a
reader cannot parse raises ``MalformedRecord`` and is skipped by the caller with a
warning (never a crash)."""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from proto import cluster_pb2 as pb
from scheduler.config import ID_PATTERN

SCHEMA_VERSION = 1


class MalformedRecord(ValueError):
    """A value in Redis that is not a record of a schema this code understands."""


def encode(message: Message) -> bytes:
    """Serialize a top-level record, stamping its schema version."""
    message.schema_version = SCHEMA_VERSION
    return message.SerializeToString(deterministic=True)


def parse(kind: type[Message], raw: bytes) -> Message:
    message = kind()
    try:
        message.ParseFromString(raw)
    except DecodeError as e:
        raise MalformedRecord(f"not a {kind.__name__} ({e})") from None
    if message.schema_version != SCHEMA_VERSION:
        raise MalformedRecord(
            f"{kind.__name__} schema version {message.schema_version}, "
            f"this reader knows {SCHEMA_VERSION}"
        )
    return message


def parse_request(raw: bytes) -> pb.DispatchedRequest:
    request = parse(pb.DispatchedRequest, raw)
    if not request.request_id or not request.owner or not request.prefill_rank_id:
        raise MalformedRecord("DispatchedRequest without request_id, owner or prefill_rank_id")
    for name in ("request_id", "owner", "prefill_rank_id", "decode_rank_id"):
        value = getattr(request, name)
        if value and not ID_PATTERN.fullmatch(value):
            raise MalformedRecord(f"DispatchedRequest.{name} is not a plain id")
    return request


def error_batch(request_id: str, message: str, rank_id: str = "") -> bytes:
    """A ResultBatch that ends one request with an error the client will read."""
    entry = pb.ResultEntry(
        request_id=request_id, finish_reason="error", error=message, rank_id=rank_id
    )
    return encode(pb.ResultBatch(entries=[entry]))
