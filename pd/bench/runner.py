"""One benchmark run: requests leave at seeded Poisson arrival times, at most
``--max-concurrency`` in flight, each timed by ``client.send``."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

import httpx

from pd.bench.client import send
from pd.bench.config import BenchConfig
from pd.bench.dataset import BenchPrompt
from pd.bench.progress import ProgressBar
from pd.bench.record import RequestRecord


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]  # in prompt order
    duration_s: float  # from the first arrival to the last request's end


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: a Poisson process of
    ``request_rate`` per second (exponential gaps), or all at 0 when it is inf."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"{seed}:arrivals")
    times, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(request_rate)
        times.append(now)
    return times


async def run(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    prompts: list[BenchPrompt],
    progress: ProgressBar,
) -> RunResult:
    limit = asyncio.Semaphore(config.max_concurrency or len(prompts))
    run_start = time.perf_counter()

    async def one(index: int, prompt: BenchPrompt) -> RequestRecord:
        async with limit:
            record = await send(client, config, model, index, prompt, run_start)
        progress.advance(record.is_success)
        return record

    tasks = []
    for index, (prompt, arrival) in enumerate(
        zip(prompts, arrival_times(len(prompts), config.request_rate, config.seed), strict=True)
    ):
        delay = run_start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, prompt)))
    records = await asyncio.gather(*tasks)
    return RunResult(list(records), time.perf_counter() - run_start)
