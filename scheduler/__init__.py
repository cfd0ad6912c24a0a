"""Cluster scheduling: `local` (one instance, no Redis) and `splitwise` (Redis).

Read in request order: dispatch_policy.py (which ranks serve a request), registry.py
(who is alive, with what load), request_queue.py (reliable per-rank queues),
result_channel.py (tokens back to the owning API server), reaper.py (what happens to
a dead rank's requests), splitwise.py (the two ends composed), local.py (the same
rank-side interface in memory, interface.py). Redis sits behind redis_link.py; the
keys are listed in keys.py; redis_server.py runs an embedded server.
"""
