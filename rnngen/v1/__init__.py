"""Generated gRPC stubs for proto/rnngen/v1 (scripts/generate_stubs.sh); do not edit."""
