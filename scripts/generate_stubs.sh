#!/usr/bin/env bash
# Generates the Python gRPC stubs from proto/ into rnngen/v1/ (needs grpcio-tools, in the test extra).
# Usage: bash scripts/generate_stubs.sh [OUTPUT_ROOT]   (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
python -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/rnngen/v1/rnngen.proto
