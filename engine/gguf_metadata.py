"""A GGUF file's config, tokenizer and chat template as an HF folder, converted once.

``transformers`` reads them from the GGUF metadata (its ``gguf_file=`` support);
we write what it read as config.json and tokenizer files into a folder of the
cache keyed by the file's SHA-256, so every later load (each process of a
cluster, each restart) reads a plain HF folder. The weights stay in the GGUF
file: ``engine.gguf_loader`` streams them at load time.

Conversion is safe against processes converting at once: one holds a lock
file (the others wait, then find the folder), and the folder appears by an
atomic rename of a finished staging folder, so no reader sees half of it and
a converter killed midway leaves only a staging folder the next one removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.gguf_loader import SUPPORTED_ARCHITECTURES, is_gguf, open_gguf, read_field

# transformers' model_type for a GGUF -> the HF architecture our registry knows.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Tensor types that make "--dtype auto" pick a dtype other than float32.
_AUTO_DTYPES = {"F16": "float16", "BF16": "bfloat16"}
SOURCE_FILE = "gguf_source.json"

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """$PD_SERVE_CACHE_DIR, else $XDG_CACHE_HOME/pd-serve (~/.cache/pd-serve)."""
    if os.environ.get("PD_SERVE_CACHE_DIR"):
        return Path(os.environ["PD_SERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pd-serve"


def model_folder(model: str | Path, cache_root: Path | None = None) -> Path:
    """The HF folder holding ``model``'s config and tokenizer: ``model`` itself, or
    for a GGUF file its converted folder in the cache."""
    return converted_folder(model, cache_root) if is_gguf(model) else Path(model)


def converted_folder(gguf_file: str | Path, cache_root: Path | None = None) -> Path:
    """``gguf_file``'s metadata as an HF folder under ``cache_root``/gguf/<sha256>,
    converted by the first caller (see the module docstring)."""
    source = Path(gguf_file).resolve()
    if not source.is_file():
        raise ValueError(f"model: no GGUF file at {gguf_file}")
    digest = file_sha256(source)
    root = (cache_root or default_cache_root()) / "gguf"
    folder = root / digest
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{digest}.lock"):
        if folder.is_dir():  # another process converted it while we waited
            return folder
        for stale in root.glob(f".{digest}.*"):  # left by a converter that was killed
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("reading config and tokenizer of %s into %s (once)", source.name, folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
        try:
            staging.chmod(0o755)
            convert_metadata(source, staging, digest)
            _publish(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder


def _publish(staging: Path, folder: Path) -> None:
    """Rename the finished ``staging`` folder to ``folder``, atomically."""
    try:
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        # NOTE: another process published it first: only where flock does not hold (NFS).
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: Path) -> str:
    # NOTE: hashing reads the whole file (~0.1 s for 100 MB, seconds for a 7B model);
    # it keys the cache by content, so a file replaced under the same name is reconverted.
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert_metadata(gguf_file: Path, out_dir: Path, digest: str) -> None:
    """Write config.json (with ``architectures`` and the auto dtype), the tokenizer
    files (chat template included) and gguf_source.json into ``out_dir``."""
    from transformers import AutoConfig, AutoTokenizer

    reader = open_gguf(gguf_file)  # refuses unsupported tensor types before any work
    tensor_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    arch = read_field(reader, "general.architecture")
    head_dim = read_field(reader, f"{arch}.attention.key_length")
    del reader
    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    architecture = _ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise ValueError(
            f"model: GGUF model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    config.architectures = [architecture]
    if head_dim is not None:
        # NOTE: transformers reads no head_dim for qwen3 (its config class then
        # defaults to 128), yet Qwen3 heads need not be hidden_size / num_heads wide.
        config.head_dim = int(head_dim)
    if len(tensor_types) == 1 and (auto := _AUTO_DTYPES.get(next(iter(tensor_types)))):
        config.dtype = auto
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    source = {"file": str(gguf_file), "sha256": digest}
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
