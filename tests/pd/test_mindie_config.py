"""``pd-serve --mindie-config``: a MindIE Server config.json read as flags, by MindIE's
rules (seeds 000/001: worldSize, tp, dp, cp, sp), every error one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pd.args import parse_args

# Seed 000's example, verbatim, in the layout of MindIE Server's config.json (the
# npuDeviceIds and maxSeqLen around it are the MindIE install guide's, for 8 devices).
SEED_MODEL_CONFIG = """
    "ModelConfig" : [
        {
            "modelInstanceType" : "Standard",
            "modelName" : "deepseekv2",
            "modelWeightPath" : "/home/data/DeepSeek-V2-Chat-W8A8-BF16/",
            "worldSize" : 8,
            "cpuMemSize" : 5,
            "npuMemSize" : 1,
            "backendType" : "atb",
            "trustRemoteCode" : false,
            "tp": 1,
            "dp": 8,
            "cp": 1,
            "sp": 1
        }
    ]
"""
SERVER_CONFIG = """{
    "Version" : "1.0.0",
    "BackendConfig" : {
        "backendName" : "mindieservice_llm_engine",
        "modelInstanceNumber" : 1,
        "npuDeviceIds" : [[0,1,2,3,4,5,6,7]],
        "ModelDeployConfig" : {
            "maxSeqLen" : 2560,
            "maxInputTokenLen" : 2048,
            "truncation" : false,
            %s
        }
    }
}"""


@pytest.fixture
def seed_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(SERVER_CONFIG % SEED_MODEL_CONFIG)
    return path


def with_model(seed_config: Path, **changes: object) -> Path:
    """The seed's config with ModelConfig[0] keys changed (None: removed)."""
    config = json.loads(seed_config.read_text())
    model = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]
    for key, value in changes.items():
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    seed_config.write_text(json.dumps(config))
    return seed_config


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pd-serve: error: "), lines
    return lines[0].removeprefix("pd-serve: error: ")


def test_seed_example_is_dp8_tp1_as_the_same_flags_would_be(seed_config: Path):
    """Eight devices, the attention data-parallel over all of them."""
    args = parse_args(["--mindie-config", str(seed_config)])
    assert (args.data_parallel_size, args.tensor_parallel_size) == (8, 1)
    assert args.model == "/home/data/DeepSeek-V2-Chat-W8A8-BF16/"
    assert args.served_model_name == ["deepseekv2"]
    assert args.max_model_len == 2560
    flags = parse_args([
        "--model", "/home/data/DeepSeek-V2-Chat-W8A8-BF16/", "--served-model-name",
        "deepseekv2", "--tensor-parallel-size", "1", "--data-parallel-size", "8",
        "--max-model-len", "2560",
    ])  # fmt: skip
    assert args == flags


@pytest.mark.parametrize("dp", [-1, None])
def test_dp_minus_one_or_left_out_is_no_data_parallelism(seed_config: Path, dp):  # type: ignore[no-untyped-def]
    """tp then defaults to worldSize, and must equal it when given."""
    path = with_model(seed_config, dp=dp, tp=None)
    args = parse_args(["--mindie-config", str(path)])
    assert (args.data_parallel_size, args.tensor_parallel_size) == (1, 8)
    assert parse_args(["--mindie-config", str(with_model(path, tp=8))]) == args


def test_dp_minus_one_with_tp_other_than_world_size(capsys, seed_config: Path):
    path = with_model(seed_config, dp=-1, tp=4)
    assert error_line(capsys, ["--mindie-config", str(path)]) == (
        f"--mindie-config {path}: tp 4 must equal worldSize 8 without dp (dp -1, the default, "
        "is no data parallelism)"
    )


def test_dp_times_tp_must_be_world_size(capsys, seed_config: Path):
    """The seed's own example: worldSize 8 with dp 2 takes tp 4, and nothing else."""
    args = parse_args(["--mindie-config", str(with_model(seed_config, dp=2, tp=4))])
    assert (args.data_parallel_size, args.tensor_parallel_size) == (2, 4)
    path = with_model(seed_config, dp=2, tp=2)
    assert error_line(capsys, ["--mindie-config", str(path)]) == (
        f"--mindie-config {path}: dp 2 * tp 2 = 4, but worldSize is 8 (dp * tp must equal "
        "worldSize)"
    )


def test_dp_without_tp_names_the_tp_it_needs(capsys, seed_config: Path):
    path = with_model(seed_config, dp=2, tp=None)
    assert error_line(capsys, ["--mindie-config", str(path)]) == (
        f"--mindie-config {path}: dp 2 with tp left out (its default is worldSize 8): "
        "dp * tp must equal worldSize; set tp to 4"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # The seed's examples of each: worldSize 16 with tp 8 and cp 2, or sp 8.
        ({"worldSize": 16, "tp": 8, "dp": 1, "cp": 2, "sp": 8},
         "cp 2 is not supported (context parallelism; it must be 1)"),
        ({"worldSize": 16, "tp": 8, "dp": 2, "sp": 8},
         "sp 8 is not supported (sequence parallelism; it must be 1)"),
    ],
)  # fmt: skip
def test_cp_and_sp_are_refused_by_name(capsys, seed_config, changes, message):  # type: ignore[no-untyped-def]
    path = with_model(seed_config, **changes)
    line = error_line(capsys, ["--mindie-config", str(path)])
    assert line == f"--mindie-config {path}: {message}"


def test_npu_device_count_must_be_world_size(capsys, tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(SERVER_CONFIG.replace("[[0,1,2,3,4,5,6,7]]", "[[0,1,2,3]]") % SEED_MODEL_CONFIG)
    assert error_line(capsys, ["--mindie-config", str(path)]) == (
        f"--mindie-config {path}: BackendConfig.npuDeviceIds lists 4 devices for worldSize 8"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 disagrees with tp 1"),
        (["--data-parallel-size", "1"], "--data-parallel-size 1 disagrees with dp 8"),
        (["--served-model-name", "a", "b"],
         "--served-model-name a b disagrees with modelName deepseekv2"),
        (["--model", "/other"], "--model /other disagrees with modelWeightPath /home/data/"),
        (["--max-model-len", "4096"], "--max-model-len 4096 disagrees with maxSeqLen 2560"),
    ],
)  # fmt: skip
def test_a_flag_given_too_must_agree_with_the_file(capsys, seed_config, flags, message):  # type: ignore[no-untyped-def]
    line = error_line(capsys, ["--mindie-config", str(seed_config), *flags])
    assert message in line
    assert line.endswith(f"in --mindie-config {seed_config}: give one of them, or the same value")


def test_a_flag_that_agrees_and_the_flags_the_file_leaves_alone(seed_config: Path):
    args = parse_args([
        "--mindie-config", str(seed_config), "--data-parallel-size", "8", "--port", "9000",
        "--dtype", "bfloat16",
    ])  # fmt: skip
    assert (args.data_parallel_size, args.api_port, args.dtype) == (8, 9000, "bfloat16")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not a JSON file (Expecting property name"),
        ('{"ModelDeployConfig": {}}',
         "no BackendConfig object (expected a MindIE Server config.json)"),
        ('{"BackendConfig": {}}', "no BackendConfig.ModelDeployConfig object"),
        (SERVER_CONFIG % '"ModelConfig": [{}, {}]',
         "BackendConfig.ModelDeployConfig.ModelConfig has 2 entries; pd-serve serves one model"),
        (SERVER_CONFIG % SEED_MODEL_CONFIG.replace('"worldSize" : 8', '"worldSize" : "8"'),
         "worldSize must be an integer, got '8'"),
        (SERVER_CONFIG % SEED_MODEL_CONFIG.replace('"dp": 8', '"dp": 0'),
         "dp 0 is not a size (-1: no data parallelism, or >= 1)"),
        (SERVER_CONFIG % SEED_MODEL_CONFIG.replace('"modelWeightPath"', '"weights"'),
         "ModelConfig[0].modelWeightPath is missing"),
    ],
)  # fmt: skip
def test_malformed_files_are_one_line_errors(capsys, tmp_path: Path, text: str, message: str):
    path = tmp_path / "config.json"
    path.write_text(text)
    line = error_line(capsys, ["--mindie-config", str(path)])
    assert line.startswith(f"--mindie-config {path}: {message}"), line


def test_a_missing_file_and_a_missing_model(capsys, tmp_path: Path):
    missing = tmp_path / "nope.json"
    assert error_line(capsys, ["--mindie-config", str(missing)]) == (
        f"--mindie-config {missing}: cannot read it (No such file or directory)"
    )
    assert error_line(capsys, ["--port", "9000"]) == (
        "the following arguments are required: --model (or --mindie-config)"
    )
