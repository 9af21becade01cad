"""The committed gRPC stubs are exactly what scripts/generate_stubs.sh makes from proto/."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("rnngen_pb2.py", "rnngen_pb2.pyi", "rnngen_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    env_path = str(Path(sys.executable).parent)
    subprocess.run(["bash", str(ROOT / "scripts" / "generate_stubs.sh"), str(tmp_path)], check=True,
                   env={"PATH": env_path + ":/usr/bin:/bin"})
    for name in STUBS:
        fresh = (tmp_path / "rnngen" / "v1" / name).read_text()
        committed = (ROOT / "rnngen" / "v1" / name).read_text()
        assert fresh == committed, f"rnngen/v1/{name} drifted from proto/: run scripts/generate_stubs.sh"
