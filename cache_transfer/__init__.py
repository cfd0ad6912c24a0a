"""KV-cache movement between prefill and decode ranks.

Read in request order: regions.py (which bytes move), pd_comm.py (Reserve / Commit /
Abort between the ranks, with reservations.py's leases), transfer_engine.py (the
backend interface and write handles), then the backends: ipc.py (one host: shared
memory on CPU, CUDA IPC on GPU), tcp.py (any two hosts), rdma.py (pyverbs, planned by
rdma_plan.py). protocols.py says which of them a rank can offer; endpoints.py turns a
backend's endpoint into pd-comm's protobuf and back.
"""
