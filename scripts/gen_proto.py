"""Regenerate the Python modules of proto/*.proto (run after editing a .proto).

    python scripts/gen_proto.py            # writes proto/*_pb2.py (and *_pb2_grpc.py for services)
    python scripts/gen_proto.py --out DIR  # writes into DIR instead (the staleness test uses it)

Needs grpcio-tools (a dev dependency, pinned so that the output is reproducible).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def has_service(proto: Path) -> bool:
    return any(line.lstrip().startswith("service ") for line in proto.read_text().splitlines())


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into ``out_dir/proto/``; return the files written."""
    from grpc_tools import protoc

    target = out_dir / "proto"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for proto in proto_files():
        rel = proto.relative_to(REPO).as_posix()
        args = ["protoc", f"-I{REPO}", f"--python_out={out_dir}"]
        if has_service(proto):
            args.append(f"--grpc_python_out={out_dir}")
        if protoc.main([*args, rel]) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
        written.append(target / f"{proto.stem}_pb2.py")
        if has_service(proto):
            written.append(target / f"{proto.stem}_pb2_grpc.py")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write proto/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
