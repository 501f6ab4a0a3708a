"""Generated gRPC/protobuf stubs of ``deft.v1`` (``protos/generate.py`` writes them; do not edit)."""
