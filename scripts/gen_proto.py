"""Generate the Python code of the contract (`proto/megaflow/v1/*.proto`).

Usage: python scripts/gen_proto.py [OUT_DIR]

Writes `megaflow/v1/*_pb2.py` and `*.pyi` stubs under OUT_DIR
(default: `src/`). The output depends only on the .proto files and the pinned
grpcio-tools / mypy-protobuf versions, so `tests/contract/test_generated.py` can
regenerate into a scratch folder and fail when the committed copy is stale.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

# No *_pb2_grpc.py: servers and clients are built from the service descriptors
# (megaflow.rpc.server / megaflow.rpc.clients), so generated stubs would be dead code.
ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("megaflow/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    # protoc finds the mypy plugin on PATH: use the one beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pkg = out_dir / "megaflow" / "v1"
    pkg.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (pkg / "__init__.py").write_text(
        '"""Generated from proto/megaflow/v1 by scripts/gen_proto.py. Do not edit."""\n'
    )
    return sorted(pkg.glob("*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src"
    for path in generate(out):
        print(path.relative_to(out))
