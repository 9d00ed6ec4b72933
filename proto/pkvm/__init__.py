"""Generated protobuf and gRPC code for the pkvm.v1 protocol (never edit by hand)."""
