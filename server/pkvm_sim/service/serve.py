"""`pkvm-sim serve`: run the simulator as a long-lived gRPC service.

    pkvm-sim serve                                    # quick-start machine, :50051, :9100
    pkvm-sim serve --profile v5.13 --memblock 0x80000000:2G --memblock 0x880000000:6G
    pkvm-sim serve --config pkvm.toml --listen 127.0.0.1:50051 --metrics-listen off

Configuration, later sources win: built-in defaults (SimConfig: the quick-start machine),
then the config file (TOML; YAML when PyYAML is installed), then environment variables
`PKVM_SIM_<KNOB>` (e.g. PKVM_SIM_PROFILE=v5.13, PKVM_SIM_MEMBLOCKS="0x80000000:4G,0x880000000:6G",
PKVM_SIM_LISTEN), then flags. A config file holds the SimConfig knobs at top level and the
server settings in a `[server]` table (listen, metrics_listen, workers, grace_seconds,
vm_lease_seconds, max_vm_lease_seconds).

Once ready it prints exactly one line, `pkvm-sim listening on HOST:PORT (metrics on
HOST:PORT)`, and serves until SIGTERM or SIGINT: health goes NOT_SERVING, in-flight calls
get the grace period to finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.profiles import profile_help

EXIT_OK = 0
EXIT_USAGE = 2
ENV_PREFIX = "PKVM_SIM_"

# SimConfig knob -> (flag, metavar, help). memblocks is the repeatable --memblock.
KNOB_FLAGS: dict[str, tuple[str, str, str]] = {
    "profile": ("--profile", profile_help(), f"kernel modelled (default {SimConfig.profile})"),
    "hyp_page_layout": ("--hyp-page-layout", "32|4|2", "struct hyp_page size (default: profile's)"),
    "page_size": ("--page-size", "4K|16K|64K", "PAGE_SIZE (default 4K)"),
    "vmemmap_coverage": ("--vmemmap-coverage", "carveout|all", "vmemmap coverage (default all)"),
    "max_order_formula": ("--max-order-formula", "v5.14|v5.17|v6.4", "hyp_pool max_order formula"),
    "memblocks": ("--memblock", "BASE:SIZE", "RAM region, repeatable (default 0x80000000:4G)"),
    "ia_bits": ("--ia-bits", "N", "host stage-2 input address bits (default 40)"),
    "nr_cpus": ("--nr-cpus", "N", "CPUs (default 8)"),
    "hyp_s1_early_used_pages": ("--hyp-s1-early-used-pages", "N", "hyp pool pages reserved"),
    "hyp_pool_extra_pages": ("--hyp-pool-extra-pages", "N", "enlarge the hyp pool by N pages"),
    "carveout_base": ("--carveout-base", "ADDR", "place the carve-out here (default top-down)"),
    "faithful_bugs": ("--faithful-bugs", "BOOL", "reproduce the kernel's quirks (v5.13)"),
}
SERVER_KEYS = (
    "listen", "metrics_listen", "workers", "grace_seconds", "vm_lease_seconds",
    "max_vm_lease_seconds",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML (or YAML) configuration file")
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="gRPC address (default 0.0.0.0:50051)"
    )
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT",
        help="Prometheus /metrics address, or 'off' (default 0.0.0.0:9100)",
    )
    parser.add_argument("--workers", metavar="N", type=int, help="RPC worker threads (16)")
    parser.add_argument(
        "--grace-seconds", metavar="S", type=float,
        help="how long in-flight calls may run after SIGTERM (default 10)",
    )
    parser.add_argument(
        "--vm-lease-seconds", metavar="S", type=float,
        help="default VM lease: a VM with no call for this long is destroyed "
        "(default 600; 0 disables leases)",
    )
    parser.add_argument(
        "--max-vm-lease-seconds", metavar="S", type=float,
        help="the longest lease CreateVM may ask for (default 86400)",
    )
    for knob, (flag, metavar, help_text) in KNOB_FLAGS.items():
        if knob == "memblocks":
            parser.add_argument(flag, dest=knob, action="append", metavar=metavar, help=help_text)
        else:
            parser.add_argument(flag, dest=knob, metavar=metavar, help=help_text)


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat mapping (server keys included)."""
    text = Path(path).read_bytes()
    data: Any
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as error:
            raise ValueError("YAML config files need PyYAML; use TOML instead") from error
        data = yaml.safe_load(text) or {}
    else:
        import tomllib

        data = tomllib.loads(text.decode())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings")
    values = {key.replace("-", "_"): value for key, value in data.items() if key != "server"}
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ValueError(f"{path}: [server] must be a table")
    for key, value in server.items():
        key = key.replace("-", "_")
        if key not in SERVER_KEYS:
            raise ValueError(f"{path}: unknown [server] key {key!r}")
        values[key] = value
    if "memblock" in values:  # accept the flag's singular spelling too
        values["memblocks"] = values.pop("memblock")
    return values


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in (*KNOB_FLAGS, *SERVER_KEYS):
        raw = environ.get(ENV_PREFIX + key.upper())
        if raw is None and key == "memblocks":
            raw = environ.get(ENV_PREFIX + "MEMBLOCK")
        if raw is None or raw == "":
            continue
        if key == "memblocks":
            values[key] = [v.strip() for v in raw.split(",") if v.strip()]
        else:
            values[key] = raw
    return values


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[SimConfig, dict[str, Any]]:
    """Merge defaults < file < environment < flags into a SimConfig and server settings."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        merged.update(load_file(config_path))
    merged.update(load_env(environ))
    for key in (*KNOB_FLAGS, *SERVER_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = value
    server = {key: merged.pop(key) for key in SERVER_KEYS if key in merged}
    known = {f.name for f in fields(SimConfig)}
    unknown = set(merged) - known
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    return SimConfig.from_mapping(merged), server


def settings_from(server: Mapping[str, Any]) -> Any:
    from .server import ServerSettings

    kwargs: dict[str, Any] = {}
    if "listen" in server:
        kwargs["listen"] = str(server["listen"])
    if "metrics_listen" in server:
        value = str(server["metrics_listen"]).strip()
        kwargs["metrics_listen"] = None if value.lower() in ("", "off", "none", "0") else value
    if "workers" in server:
        kwargs["workers"] = int(server["workers"])
    if "grace_seconds" in server:
        kwargs["grace_seconds"] = float(server["grace_seconds"])
    for key in ("vm_lease_seconds", "max_vm_lease_seconds"):
        if key in server:
            kwargs[key] = float(server[key])
    settings = ServerSettings(**kwargs)
    from .leases import LeaseTable

    LeaseTable(settings.vm_lease_seconds, settings.max_vm_lease_seconds)  # ValueError if bad
    return settings


def run(args: argparse.Namespace) -> int:
    try:
        config, server_values = resolve(args)
        settings = settings_from(server_values)
    except (ValueError, OSError) as error:
        print(f"pkvm-sim serve: {error}", file=sys.stderr)
        return EXIT_USAGE

    from .server import start

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        service = start(config, settings)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"pkvm-sim serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    metrics = f" (metrics on {service.metrics_address})" if service.metrics_address else ""
    print(f"pkvm-sim listening on {service.address}{metrics}", flush=True)
    while not stop_requested.wait(1.0):
        pass
    service.stop(settings.grace_seconds)
    return EXIT_OK
