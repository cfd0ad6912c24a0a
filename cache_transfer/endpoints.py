"""Transfer-endpoint descriptors: the dicts backends publish <-> pd-comm's Endpoint."""

from __future__ import annotations

from google.protobuf.message import Message

from proto import pd_comm_pb2 as pb

# endpoint dict "kind" (or protocol, for tcp/rdma) -> the Endpoint oneof field
_FIELDS = {"tcp": "tcp", "shm": "shm", "cuda": "cuda_ipc", "rdma": "rdma"}


def _kind(endpoint: dict) -> str:
    return endpoint.get("kind", endpoint["protocol"])


def endpoint_to_proto(endpoint: dict) -> pb.Endpoint:
    field = _FIELDS[_kind(endpoint)]
    message_type = getattr(pb.Endpoint(), field).__class__
    names = {f.name for f in message_type.DESCRIPTOR.fields}
    return pb.Endpoint(**{field: message_type(**{k: v for k, v in endpoint.items() if k in names})})


def endpoint_from_proto(endpoint: pb.Endpoint) -> dict:
    field = endpoint.WhichOneof("kind")
    if field is None:
        raise ValueError("the reply carries no transfer endpoint")
    message: Message = getattr(endpoint, field)
    fields = {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}
    kind = {v: k for k, v in _FIELDS.items()}[field]
    protocol = "ipc" if kind in ("shm", "cuda") else kind
    return {"protocol": protocol, "kind": kind, **fields}
