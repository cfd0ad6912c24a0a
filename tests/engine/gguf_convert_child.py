"""A process that converts a GGUF file's metadata (for the concurrency test), logging
its pid when it converts; kept apart so that spawning it imports little."""

from __future__ import annotations

import os
import time
from pathlib import Path

import engine.gguf_metadata as gguf_metadata


def convert_in_child(gguf_file: Path, cache_root: Path, log: Path, barrier, results) -> None:
    original = gguf_metadata.convert_metadata

    def logged(source: Path, out_dir: Path, digest: str) -> None:
        with log.open("a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the other process arrives while this one converts
        original(source, out_dir, digest)

    gguf_metadata.convert_metadata = logged
    barrier.wait()
    results.put(str(gguf_metadata.converted_folder(gguf_file, cache_root)))
