"""How the offline ``LLM`` runs its requests (``pd/llm.py`` is the front: prompts,
sampling parameters, detokenizing; a backend here runs the engine requests):

- ``in_process``: one ``EngineCore`` in this process (one DP rank: the only one, or
  rank r of ranks that other processes run, vLLM's one process per DP rank);
- ``data_parallel``: an engine-core process per DP rank, requests placed on the
  least loaded one (``rank_processes`` starts them, ``rank_link`` talks to each);
- ``splitwise``: the same processes registered in a Redis cluster, requests
  dispatched through it like an online API server's.

``options`` reads the keywords beyond one engine's (DP placement, port lists, the
cluster scheduler); ``start_backend`` picks the backend.
"""
