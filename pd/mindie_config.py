"""``pd-serve --mindie-config PATH``: a MindIE Server config.json read as pd-serve flags.

MindIE users set parallelism in ``BackendConfig.ModelDeployConfig.ModelConfig[0]``
(``worldSize``, ``tp``, ``dp``, ``cp``, ``sp``), with MindIE's rules:

- ``dp`` -1 (the default) is no data parallelism; ``tp`` must then be ``worldSize``,
  which is also its default;
- with a ``dp``, ``dp * tp`` must equal ``worldSize`` (``tp`` still defaults to
  ``worldSize``, so a ``dp`` above 1 needs its ``tp``);
- ``cp`` and ``sp`` other than 1 are refused: pd-serve has neither context nor
  sequence parallelism.

What maps cleanly becomes a flag, and nothing else is read::

    ModelConfig[0].modelWeightPath   --model
    ModelConfig[0].modelName         --served-model-name
    ModelConfig[0].tp                --tensor-parallel-size
    ModelConfig[0].dp                --data-parallel-size (-1: 1)
    ModelDeployConfig.maxSeqLen      --max-model-len

``BackendConfig.npuDeviceIds`` is checked, not mapped (device ids are the
environment's: ``CUDA_VISIBLE_DEVICES``): one group, for one model instance, of
``worldSize`` devices. A flag given on the command line too must agree with the file.
Standard library only (``pd-serve --help`` must not import torch).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

NO_DATA_PARALLEL = -1  # MindIE's dp for "no data parallelism"
_UNSUPPORTED = {"cp": "context parallelism", "sp": "sequence parallelism"}


@dataclass(frozen=True)
class MindIEModel:
    """The settings read from one MindIE config (``dp`` is 1 where MindIE says -1)."""

    model_weight_path: str
    model_name: str | None
    world_size: int
    tp: int
    dp: int
    max_seq_len: int | None = None

    def flag_values(self) -> list[tuple[str, str, Any]]:
        """(pd-serve flag, MindIE key, the flag's value) for what the file sets."""
        values = [
            ("--model", "modelWeightPath", self.model_weight_path),
            ("--tensor-parallel-size", "tp", self.tp),
            ("--data-parallel-size", "dp", self.dp),
        ]
        if self.model_name is not None:
            values.append(("--served-model-name", "modelName", [self.model_name]))
        if self.max_seq_len is not None:
            values.append(("--max-model-len", "maxSeqLen", self.max_seq_len))
        return values


def apply_mindie_config(namespace: argparse.Namespace) -> None:
    """Set the flags ``namespace.mindie_config`` names; one also given on the command
    line (not None in ``namespace``) must agree. Raises ValueError (one line)."""
    path = namespace.mindie_config
    for flag, key, value in read_mindie_config(path).flag_values():
        dest = flag.removeprefix("--").replace("-", "_")
        given = getattr(namespace, dest)
        if given is not None and given != value:
            raise ValueError(
                f"{flag} {_shown(given)} disagrees with {key} {_shown(value)} in "
                f"--mindie-config {path}: give one of them, or the same value"
            )
        setattr(namespace, dest, value)


def read_mindie_config(path: str) -> MindIEModel:
    """Read and check a MindIE Server config.json. Raises ValueError (one line)."""
    where = f"--mindie-config {path}"
    try:
        with open(path, encoding="utf-8") as file:
            root = json.load(file)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where}: not a JSON file ({exc})") from None
    backend = _section(root, "BackendConfig", where)
    deploy = _section(backend, "ModelDeployConfig", where, "BackendConfig.")
    models = deploy.get("ModelConfig")
    if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], dict):
        count = f"{len(models)} entries" if isinstance(models, list) else "no list"
        raise ValueError(
            f"{where}: BackendConfig.ModelDeployConfig.ModelConfig has {count}; pd-serve "
            "serves one model per instance (a list of one object)"
        )
    model = models[0]
    world_size = _integer(model, "worldSize", where, low=1)
    if world_size is None:
        raise ValueError(f"{where}: ModelConfig[0].worldSize is missing")
    weight_path = _text(model, "modelWeightPath", where)
    if weight_path is None:
        raise ValueError(f"{where}: ModelConfig[0].modelWeightPath is missing")
    tp, dp = _parallel_sizes(model, world_size, where)
    _check_devices(backend, world_size, where)
    return MindIEModel(
        model_weight_path=weight_path,
        model_name=_text(model, "modelName", where),
        world_size=world_size,
        tp=tp,
        dp=dp,
        max_seq_len=_integer(deploy, "maxSeqLen", where, low=1),
    )


def _parallel_sizes(model: dict, world_size: int, where: str) -> tuple[int, int]:
    """(tp, dp) by MindIE's rules; dp -1 becomes 1."""
    for key, what in _UNSUPPORTED.items():
        value = _integer(model, key, where, low=1)
        if value not in (None, 1):
            raise ValueError(f"{where}: {key} {value} is not supported ({what}; it must be 1)")
    tp = _integer(model, "tp", where, low=1)
    dp = _integer(model, "dp", where, low=NO_DATA_PARALLEL)
    if dp == 0:
        raise ValueError(f"{where}: dp 0 is not a size (-1: no data parallelism, or >= 1)")
    if dp in (None, NO_DATA_PARALLEL):
        if tp not in (None, world_size):
            raise ValueError(
                f"{where}: tp {tp} must equal worldSize {world_size} without dp (dp -1, the "
                "default, is no data parallelism)"
            )
        return world_size, 1
    if tp is None:
        hint = f"; set tp to {world_size // dp}" if world_size % dp == 0 else ""
        raise ValueError(
            f"{where}: dp {dp} with tp left out (its default is worldSize {world_size}): "
            f"dp * tp must equal worldSize{hint}"
        )
    if dp * tp != world_size:
        raise ValueError(
            f"{where}: dp {dp} * tp {tp} = {dp * tp}, but worldSize is {world_size} "
            "(dp * tp must equal worldSize)"
        )
    return tp, dp


def _check_devices(backend: dict, world_size: int, where: str) -> None:
    groups = backend.get("npuDeviceIds")
    if groups is None:
        return
    if not isinstance(groups, list) or not all(isinstance(group, list) for group in groups):
        raise ValueError(f"{where}: BackendConfig.npuDeviceIds must be a list of lists")
    if len(groups) != 1:
        raise ValueError(
            f"{where}: BackendConfig.npuDeviceIds has {len(groups)} groups (model "
            "instances); pd-serve runs one instance per process"
        )
    if len(groups[0]) != world_size:
        raise ValueError(
            f"{where}: BackendConfig.npuDeviceIds lists {len(groups[0])} devices for "
            f"worldSize {world_size}"
        )


def _section(parent: Any, key: str, where: str, prefix: str = "") -> dict:
    section = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{where}: no {prefix}{key} object (expected a MindIE Server config.json)")
    return section


def _integer(section: dict, key: str, where: str, low: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{where}: {key} must be >= {low}, got {value}")
    return value


def _text(section: dict, key: str, where: str) -> str | None:
    value = section.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _shown(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)
