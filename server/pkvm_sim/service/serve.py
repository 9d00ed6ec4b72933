"""`pkvm-sim serve`: run the simulator as a long-lived gRPC service.

    pkvm-sim serve                          # quick-start machine, 127.0.0.1:50051 and :9100
    pkvm-sim serve --profile v5.13 --memblock 0x80000000:2G --memblock 0x880000000:6G
    pkvm-sim serve --config pkvm.toml --listen 127.0.0.1:50051 --metrics-listen off

Configuration, later sources win: built-in defaults (SimConfig: the quick-start machine),
then the config file (TOML; YAML when PyYAML is installed), then environment variables
`PKVM_SIM_<KNOB>` (e.g. PKVM_SIM_PROFILE=v5.13, PKVM_SIM_MEMBLOCKS="0x80000000:4G,0x880000000:6G",
PKVM_SIM_LISTEN), then flags. A config file holds the SimConfig knobs at top level and the
server settings in a `[server]` table. Every knob is declared once, in pkvm_sim/knobs.py.

With `--state-file PATH` the machine outlives the process: restored from PATH at start when
the file exists, saved there on SIGTERM/SIGINT and by the SaveState RPC (docs/state-file.md).

Once ready it prints exactly one line, `pkvm-sim listening on HOST:PORT (metrics on
HOST:PORT)`, and serves until SIGTERM or SIGINT: health goes NOT_SERVING, in-flight calls
get the grace period to finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pkvm_sim.core.config import SimConfig
from pkvm_sim.knobs import (
    ENV_PREFIX,
    LIMITS,
    NOT_SETTINGS,
    SERVICE_KNOBS,
    SIM_KNOBS,
    add_service_arguments,
    add_sim_arguments,
    env_error,
    parse_service_value,
    unknown_env_variables,
)
from pkvm_sim.version import version_line

log = logging.getLogger("pkvm_sim.serve")

# How often the main thread looks for a stop signal (SIGTERM, SIGINT).
STOP_POLL_SECONDS = 0.1
EXIT_OK = 0
EXIT_USAGE = 2
ENV_HELP = (
    "Environment: every flag has a PKVM_SIM_<NAME> variable (named in its help; e.g."
    " PKVM_SIM_PROFILE=v5.13, PKVM_SIM_MEMBLOCKS=0x80000000:4G,0x880000000:6G,"
    " PKVM_SIM_LISTEN=0.0.0.0:50051), and PKVM_SIM_CONFIG=FILE is --config. Sources, later"
    " wins: defaults < config file < environment < flags. An unknown PKVM_SIM_* variable is"
    " an error, like an unknown config-file key."
)
SIM_KEYS = tuple(knob.name for knob in SIM_KNOBS)
SERVER_KEYS = tuple(knob.name for knob in SERVICE_KNOBS)
LIMIT_KEYS = tuple(knob.name for knob in SERVICE_KNOBS if knob.section == LIMITS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ENV_HELP
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML (or YAML) configuration file (env {ENV_PREFIX}CONFIG)")
    add_service_arguments(parser)
    add_sim_arguments(parser, env=True)


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
    """The knobs set by PKVM_SIM_* variables; ValueError names any unknown one."""
    unknown = unknown_env_variables(environ)
    if unknown:
        raise ValueError(env_error(unknown))
    values: dict[str, Any] = {}
    for key in (*SIM_KEYS, *SERVER_KEYS):
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
    for key in (*SIM_KEYS, *SERVER_KEYS):
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
    """ServerSettings (limits included) from loosely typed values; ValueError when bad."""
    from .leases import LeaseTable
    from .limits import Limits
    from .server import ServerSettings, check_key_pair

    values = {key: parse_service_value(key, value) for key, value in server.items()}
    limits = Limits(**{key: values.pop(key) for key in LIMIT_KEYS if key in values})
    for key in NOT_SETTINGS:
        values.pop(key, None)
    settings = ServerSettings(**values)
    settings = replace(settings, limits=limits)
    LeaseTable(settings.vm_lease_seconds, settings.max_vm_lease_seconds)  # ValueError if bad
    if settings.tls_cert is not None and settings.tls_key is not None:
        check_key_pair(settings.tls_cert, settings.tls_key)  # before any log line
    return settings


def configure_logging(level: str) -> None:
    """stdlib logging to stderr; the ready line stays alone on stdout."""
    logging.basicConfig(
        stream=sys.stderr, level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def effective_configuration(config: SimConfig, settings: Any) -> str:
    """One line with every setting in effect (file names, never a token)."""
    machine = ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config))
    server = ", ".join(
        f"{f.name}={getattr(settings, f.name)}" for f in fields(settings)
        if f.name not in ("limits", "extra_options")
    )
    limits = ", ".join(f"{f.name}={getattr(settings.limits, f.name)}"
                       for f in fields(settings.limits))
    return f"configuration: {machine}; {server}; {limits}"


def explicit_knobs(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> set[str]:
    """The SimConfig knobs the user set (config file, environment or flags)."""
    environ = os.environ if environ is None else environ
    given: set[str] = set()
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        given |= set(load_file(config_path))
    given |= set(load_env(environ))
    given |= {key for key in SIM_KEYS if getattr(args, key, None) is not None}
    return given & set(SIM_KEYS)


def bind_problem(address: str | None, what: str) -> str | None:
    """Why `address` cannot be listened on (e.g. a port in use), naming it, or None.

    Checked before the servers start so that the message is ours, one line: gRPC's own
    failure prints a C-core log line and advice about GRPC_VERBOSITY, the metrics server's
    a bare `[Errno 98]`. A port taken between this check and the real bind still fails the
    start (with gRPC's words)."""
    if not address:
        return None
    from .server import split_host_port

    host, port = split_host_port(address)
    if port == 0:
        return None  # any free port
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot listen on {address} ({what}): {error.strerror}"
    failure: OSError | None = None
    for family, kind, proto, _name, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            try:
                probe.bind(sockaddr)
            except OSError as error:
                failure = failure or error
                continue
        return None  # one address binds: the server serves on it (as gRPC does)
    assert failure is not None
    reason = "address already in use" if failure.errno == errno.EADDRINUSE \
        else (failure.strerror or str(failure)).lower()
    return f"cannot listen on {address} ({what}): {reason}"


def run(args: argparse.Namespace) -> int:
    try:
        config, server_values = resolve(args)
        level = parse_service_value("log_level", server_values.get("log_level", "INFO"))
        settings = settings_from(server_values)
    except (ValueError, OSError) as error:
        print(f"pkvm-sim serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(level)
    keeper = None
    restored = None
    if server_values.get("state_file"):
        from .persist import restore_at_start

        outcome = restore_at_start(str(server_values["state_file"]), config,
                                   explicit_knobs(args))
        if isinstance(outcome, str):
            print(f"pkvm-sim serve: {outcome}", file=sys.stderr)
            return EXIT_USAGE
        keeper, restored = outcome
        if restored is not None:
            config = restored.config
    # The GIL switch interval is 0.2 ms only while the fair worker has work (fairness.py):
    # Python's 5 ms otherwise, where the shorter one halved unary throughput.

    from .server import start

    # The handler only appends to a list: it runs between two bytecodes of the main thread,
    # which may be holding a lock at that moment (an Event's, if the handler called set()
    # while the main thread waited on it: two signals at once deadlocked the server so).
    stop_signals: list[int] = []

    def request_stop(signum: int, frame: object) -> None:
        stop_signals.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("%s", effective_configuration(config, settings))
    problem = (bind_problem(settings.listen, "gRPC")
               or bind_problem(settings.metrics_listen, "metrics"))
    if problem is not None:
        print(f"pkvm-sim serve: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        service = start(config, settings, state=keeper,
                        hypervisor=restored.hypervisor if restored else None)
    except (ValueError, OSError, RuntimeError) as error:
        if keeper is not None:
            keeper.release()
        print(f"pkvm-sim serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    metrics = f" (metrics on {service.metrics_address})" if service.metrics_address else ""
    tls = " with TLS" if service.tls else ""
    log.info("ready: %s", version_line())
    print(f"pkvm-sim listening on {service.address}{tls}{metrics}", flush=True)
    while not stop_signals:
        time.sleep(STOP_POLL_SECONDS)
    if keeper is None:
        log.info("stopping: in-flight calls get %g s", settings.grace_seconds)
        service.stop(settings.grace_seconds)
        return EXIT_OK
    # The save comes after in-flight calls (the file holds their effects) and inside the
    # grace period too: a supervisor that kills after --grace-seconds never cuts it short.
    calls_seconds = keeper.calls_grace(settings.grace_seconds)
    log.info("stopping: in-flight calls get %g s, the save the rest of %g s", calls_seconds,
             settings.grace_seconds)
    service.stop(calls_seconds)
    from .persist import save_at_exit

    try:
        return save_at_exit(keeper, service.servicer)
    finally:
        keeper.release()
