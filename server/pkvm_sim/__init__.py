"""pkvm-sim: a simulator of pKVM's EL2 memory manager, served over gRPC."""

__version__ = "0.1.0"
