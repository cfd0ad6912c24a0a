"""Cluster scheduling: `local` (one instance) and `splitwise` (Redis).

So far: the P/D dispatch policy (dispatch_policy.py); the Redis registry, queues
and result channels come next.
"""
