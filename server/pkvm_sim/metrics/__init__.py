"""pkvm_sim.metrics: Prometheus exposition of the simulator's state, read at scrape time."""

from .collector import HypervisorCollector

__all__ = ["HypervisorCollector"]
