"""``pd-bench``: an OpenAI-compatible load generator for pd-serve (or any server
that speaks the OpenAI streaming API).

The files follow one run: ``config`` (flags) -> ``dataset`` (seeded prompts) ->
``runner`` (arrivals and concurrency) -> ``client`` (one streamed, timed request
-> ``RequestRecord``) -> ``stats`` (pure summaries) -> ``report`` (table, JSON).
"""

from __future__ import annotations

from pd.bench.cli import main

__all__ = ["main"]
