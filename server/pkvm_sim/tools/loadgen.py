"""`pkvm-sim loadgen`: the old name of `pkvm-sim load` (pkvm_sim.tools.load), kept as an alias.

It takes every flag `load` takes, and the old ones keep their meaning: `--json` without a
file prints the report to stdout, `--mmio-window` is `--mmio-span`, `--max-ops` is per VM.
"""

from __future__ import annotations

from pkvm_sim.tools.load import add_arguments, run

__all__ = ["add_arguments", "run"]
