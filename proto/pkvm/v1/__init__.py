"""pkvm.v1: the HypervisorService protocol."""
