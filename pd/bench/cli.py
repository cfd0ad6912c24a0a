"""``pd-bench`` end to end: flags -> model -> prompts -> run -> report -> exit code.

Exit codes: 0 when the run happened (some requests may have failed), 1 when every
request failed, 2 for bad flags (including a --tokenizer that cannot be loaded).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from pd.bench.client import RequestFailed, first_model_id, open_client
from pd.bench.config import BenchConfig, parse_config
from pd.bench.dataset import (
    BenchPrompt,
    Vocabulary,
    default_tokenizer_path,
    load_vocabulary,
    make_prompts,
)
from pd.bench.progress import ProgressBar
from pd.bench.record import RequestRecord
from pd.bench.report import format_table, result_document, write_json
from pd.bench.runner import RunResult, run
from pd.bench.stats import summarize

EXIT_OK, EXIT_ALL_FAILED, EXIT_BAD_FLAGS = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    vocabulary = None
    if config.tokenizer is not None:
        try:
            vocabulary = load_vocabulary(config.tokenizer)
        except ValueError as error:
            print(f"pd-bench: error: --tokenizer: {error}", file=sys.stderr)
            return EXIT_BAD_FLAGS
    return asyncio.run(_bench(config, vocabulary))


async def _bench(config: BenchConfig, vocabulary: Vocabulary | None) -> int:
    async with open_client(config) as client:
        try:
            model = config.model or await first_model_id(client, config.base_url)
        except RequestFailed as error:
            model = "(unknown)"
            result = _all_failed(config.num_prompts, f"no model to request: {error}")
        else:
            prompts = _prompts(config, vocabulary or _guess_vocabulary(model))
            progress = ProgressBar(config.num_prompts, enabled=config.show_progress)
            result = await run(client, config, model, prompts, progress)
            progress.close()
    summary = summarize(result.records, result.duration_s, config.slo)
    print(format_table(config, model, summary))
    if config.result_json is not None:
        try:
            write_json(config.result_json, result_document(config, model, summary, result.records))
        except OSError as error:
            print(f"pd-bench: cannot write --result-json: {error}", file=sys.stderr)
    return EXIT_OK if summary.num_success else EXIT_ALL_FAILED


def _prompts(config: BenchConfig, vocabulary: Vocabulary | None) -> list[BenchPrompt]:
    if vocabulary is None:
        print(
            "pd-bench: no tokenizer (see --tokenizer): prompts are random words, "
            f"about {config.input_len} tokens each",
            file=sys.stderr,
        )
    return make_prompts(
        num_prompts=config.num_prompts,
        input_len=config.input_len,
        input_len_range=config.input_len_range,
        output_len=config.output_len,
        output_len_range=config.output_len_range,
        seed=config.seed,
        vocabulary=vocabulary,
        as_token_ids=config.endpoint == "completions",
    )


def _guess_vocabulary(model: str) -> Vocabulary | None:
    """The model id's tokenizer, when the id is a local model folder."""
    path = default_tokenizer_path(model)
    if path is None:
        return None
    try:
        return load_vocabulary(path)
    except ValueError as error:
        print(f"pd-bench: ignoring the tokenizer at {path}: {error}", file=sys.stderr)
        return None


def _all_failed(num_requests: int, error: str) -> RunResult:
    return RunResult([RequestRecord.failed(i, error) for i in range(num_requests)], 0.0)
