"""Generated protobuf modules of the cluster wire contract."""
