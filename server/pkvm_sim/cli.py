"""`pkvm-sim`: one command, one subcommand per tool.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args)`;
modules are imported only when their subcommand runs, so `pkvm-sim reserve` never loads gRPC.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pkvm_sim.service.serve", "run the gRPC service (default configuration: 4 GiB)"),
    "reserve": ("pkvm_sim.tools.reserve", "print the EL2 carve-out (reservation) breakdown"),
    "replay-trace": ("pkvm_sim.tools.replay_trace", "replay hyp-pool-trace/1 oracle traces"),
    "scenario": ("pkvm_sim.tools.scenario", "run a seeded workload, e.g. mmio-pressure"),
    "load": ("pkvm_sim.tools.load", "load-test a running service: many VMs, histograms, reports"),
    "loadgen": ("pkvm_sim.tools.loadgen", "alias of `load` (kept for old scripts)"),
    "kernel-check": ("pkvm_sim.tools.kernel_check",
                     "boot real kernels under QEMU, compare their EL2 reservation with ours"),
    "healthcheck": ("pkvm_sim.tools.healthcheck", "exit 0 if a local service says SERVING"),
    "draw": ("pkvm_sim.tools.draw", "draw a running service's memory: pools, free blocks"),
    "state": ("pkvm_sim.tools.state", "inspect a state file (serve --state-file)"),
    "capacity": ("pkvm_sim.tools.capacity",
                 "how many guests of a shape a machine carries, and which limit binds"),
    "sweep": ("pkvm_sim.tools.sweep", "run a grid of simulations on Dask (the sweep extra)"),
}


class VersionAction(argparse.Action):
    """--version: the package version and which core runs (computed only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and the core flavour (compiled/pure), exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from .version import version_line

        print(version_line())  # on stdout, as argparse's own version action does
        parser.exit()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkvm-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == wanted:  # import only what runs
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(func=module.run)
    return parser


# Imported only by the service: `pip install pkvm-sim` alone (the SDK) does not bring them.
SERVER_ONLY_MODULES = frozenset({"grpc_health", "grpc_reflection", "grpc_status",
                                 "prometheus_client"})
EXIT_USAGE = 2
# A reader that went away (`pkvm-sim reserve --compare | head -1`): end as quietly as `cat`
# does, with the status of a process killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _quiet_after_broken_pipe() -> int:
    """Point stdout at /dev/null so that the interpreter's final flush of what is still
    buffered cannot raise BrokenPipeError a second time at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:  # a subcommand's module may import them when loaded, or only when it runs
        args = build_parser(argv).parse_args(argv)
        code = int(args.func(args))
        sys.stdout.flush()  # a pipe that closed early shows up here, inside the try
        return code
    except BrokenPipeError:
        return _quiet_after_broken_pipe()
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in SERVER_ONLY_MODULES:
            raise
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"pkvm-sim {command}: needs the server's dependencies ({error.name} is "
              "missing): pip install 'pkvm-sim[server]'", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
