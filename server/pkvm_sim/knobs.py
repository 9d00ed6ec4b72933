"""Every configuration knob, declared once: its flag, environment variable, config-file key,
parser and help text. Defaults are never written here: help text reads them from the
dataclass that owns the knob (`SimConfig`, `ServerSettings`, `Limits`: pkvm_sim/settings.py),
so they cannot drift.

Sources, later wins: defaults < `--config FILE` (TOML; YAML with PyYAML) < environment
`PKVM_SIM_<KNOB>` < flags. In a config file the machine knobs sit at top level and the
server knobs (listen address, security, limits) in a `[server]` table.

It lives beside `cli.py` and `settings.py`, outside the service, and imports no gRPC: `serve`
and the offline tools (`reserve`, `scenario`) declare their machine flags through
`add_sim_arguments`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.profiles import profile_help
from pkvm_sim.settings import Limits, ServerSettings, parse_bool, split_host_port

SIM = "sim"
SERVER = "server"
LIMITS = "limits"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_PREFIX = "PKVM_SIM_"
# PKVM_SIM_* variables that are not `serve` knobs: the config file, the singular spelling of
# PKVM_SIM_MEMBLOCKS, and the variables of other tools of the project, which a user may well
# have exported in the same shell (deploy/*.yml, scripts/, kernel-check, interop/node).
ENV_NOT_KNOBS = frozenset({
    "PKVM_SIM_CONFIG", "PKVM_SIM_MEMBLOCK",
    "PKVM_SIM_IMAGE", "PKVM_SIM_GRPC_PORT", "PKVM_SIM_METRICS_PORT",
    "PKVM_SIM_V513_GRPC_PORT", "PKVM_SIM_V514_GRPC_PORT",
    "PKVM_SIM_KERNEL_CACHE", "PKVM_SIM_DEBIAN_MIRROR", "PKVM_SIM_CACHE", "PKVM_SIM_TARGET",
    "PKVM_SIM_PURE_PYTHON",  # which core runs (pkvm_sim.core), read before any knob
    "PKVM_SIM_EXTRAS", "PKVM_SIM_SWEEP_IMAGE",  # the image's build and the sweep stack
})


def non_negative_int(value: Any) -> int:
    number = int(value, 0) if isinstance(value, str) else int(value)
    if number < 0:
        raise ValueError(f"must be >= 0, not {number}")
    return number


def seconds(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"must be a finite number of seconds >= 0, not {value!r}")
    return number


def address(value: Any) -> str | None:
    """HOST:PORT, port 1..65535 (0 = any free port); 'off' disables (metrics only)."""
    text = str(value).strip()
    if text.lower() in ("", "off", "none"):
        return None
    split_host_port(text)
    return text


boolean = parse_bool  # the one boolean parser of every source (flags, file, environment)


def log_level(value: Any) -> str:
    text = str(value).upper()
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return text


@dataclass(frozen=True)
class Knob:
    name: str  # config-file key, PKVM_SIM_<NAME>, and the flag --<name with dashes>
    section: str  # SIM (SimConfig), SERVER (ServerSettings) or LIMITS (Limits)
    help: str
    metavar: str = "VALUE"
    parse: Callable[[Any], Any] | None = None  # None: SimConfig.from_mapping coerces
    flag: str = ""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SIM_KNOBS = (
    Knob("profile", SIM, "kernel modelled", profile_help()),
    Knob("hyp_page_layout", SIM, "struct hyp_page size (none: the profile's)", "32|8|4|2"),
    Knob("page_size", SIM, "PAGE_SIZE", "4K|16K|64K"),
    Knob("vmemmap_coverage", SIM, "vmemmap coverage", "carveout|all"),
    Knob("max_order_formula", SIM, "hyp_pool max_order formula", "v5.14|v5.17|v6.4"),
    Knob("memblocks", SIM, "RAM region, repeatable (env: comma-separated)", "BASE:SIZE",
         flag="--memblock"),
    Knob("ia_bits", SIM, "host stage-2 input address bits (32..52; above 48 needs LPA2, "
         "v6.9+, or 64K pages)", "N"),
    Knob("nr_cpus", SIM, "CPUs (EL2 maps each one's per-CPU area, stack, fixmap)", "N"),
    Knob("hyp_s1_early_used_pages", SIM, "hyp pool pages the boot stage-1 took (none: "
         "what the modelled boot takes, v6.1/v6.12)", "N"),
    Knob("hyp_pool_extra_pages", SIM, "enlarge the hyp pool by N pages", "N"),
    Knob("carveout_base", SIM, "place the carve-out here (none: top-down)", "ADDR"),
    Knob("faithful_bugs", SIM, "reproduce the kernel's quirks (v5.13)", "BOOL", parse_bool),
    Knob("kernel_image_base", SIM, "where the kernel image sits (none: QEMU virt's, RAM "
         "base + 2 MiB)", "ADDR"),
    Knob("kvm_percpu_base", SIM, "where KVM's per-CPU host allocations start (none: 10 MiB "
         "into the RAM above 4 GiB, as on QEMU virt)", "ADDR"),
)
SERVER_KNOBS = (
    Knob("listen", SERVER, "gRPC address (0.0.0.0 to serve other machines)", "HOST:PORT",
         address),
    Knob("metrics_listen", SERVER, "Prometheus /metrics address, or 'off'", "HOST:PORT",
         address),
    Knob("metrics_per_vm", SERVER, "export each VM pool's series too (their count then "
         "grows with the VMs)", "BOOL", boolean),
    Knob("grace_seconds", SERVER, "shutdown completes within this, whatever is running", "S",
         seconds),
    Knob("vm_lease_seconds", SERVER, "a VM with no call for this long is destroyed "
         "(0: no leases)", "S", seconds),
    Knob("max_vm_lease_seconds", SERVER, "the longest lease CreateVM may ask for", "S",
         seconds),
    Knob("tls_cert", SERVER, "PEM certificate chain: serve TLS (with --tls-key)", "FILE", str),
    Knob("tls_key", SERVER, "PEM private key of --tls-cert", "FILE", str),
    Knob("tls_client_ca", SERVER, "PEM CA bundle: require client certificates (mutual TLS)",
         "FILE", str),
    Knob("client_token_file", SERVER, "CreateVM and host-wide calls need a token of this "
         "file: one per line, 'TOKEN' or 'NAME TOKEN' (each line is one client)", "FILE", str),
    Knob("workers", SERVER, "ignored (the asyncio server needs no worker threads)", "N",
         non_negative_int),
    Knob("log_level", SERVER, "logging level: DEBUG, INFO, WARNING or ERROR", "LEVEL",
         log_level),
    Knob("state_file", SERVER, "keep the machine here: restored at start if the file exists, "
         "saved on SIGTERM/SIGINT and by SaveState (docs/state-file.md)", "PATH", str),
)
LIMIT_KNOBS = (
    Knob("max_vms", LIMITS, "VMs the server holds at once (0: the VM table's 4096)", "N",
         non_negative_int),
    Knob("quota_slice_pages", LIMITS, "the largest slice one VM may ask for (0: no limit)",
         "N", non_negative_int),
    Knob("quota_hyp_pages", LIMITS, "pages one VM may hold from the hyp pool at once "
         "(0: no limit)", "N", non_negative_int),
    Knob("quota_memcache_pages", LIMITS, "host pages one VM's memcache may hold "
         "(TopupMemcache; 0: no limit)", "N", non_negative_int),
    Knob("max_pages_per_op", LIMITS, "pages per page-by-page operation (1..4096)", "N",
         non_negative_int),
    Knob("max_streams", LIMITS, "open Execute streams in all (0: no limit)", "N",
         non_negative_int),
    Knob("max_streams_per_vm", LIMITS, "open Execute streams per VM (0: no limit)", "N",
         non_negative_int),
    Knob("max_concurrent_rpcs", LIMITS, "calls served at once (0: no limit)", "N",
         non_negative_int),
    Knob("stream_idle_seconds", LIMITS, "an Execute stream with no batch for this long is "
         "closed (0: never)", "S", seconds),
    Knob("max_connections", LIMITS, "client connections accepted at once (0: no limit)", "N",
         non_negative_int),
    Knob("max_streams_per_connection", LIMITS, "concurrent HTTP/2 streams (calls) per "
         "connection; more are refused by HTTP/2 (0: no limit)", "N", non_negative_int),
    Knob("max_vms_per_client", LIMITS, "VMs one client holds at once (a client: its line of "
         "--client-token-file, else its connection; 0: no limit)", "N", non_negative_int),
    Knob("max_streams_per_client", LIMITS, "open Execute streams on the VMs one client "
         "created (0: no limit)", "N", non_negative_int),
    Knob("max_lease_seconds_per_client", LIMITS, "lease seconds one client's live VMs hold "
         "in all (0: no limit)", "S", seconds),
)
SERVICE_KNOBS = SERVER_KNOBS + LIMIT_KNOBS
ALL_KNOBS = SIM_KNOBS + SERVICE_KNOBS
BY_NAME = {knob.name: knob for knob in ALL_KNOBS}
# Log level and the state file are the serve command's, not ServerSettings fields.
NOT_SETTINGS = ("log_level", "state_file")


def _owner_defaults(section: str) -> dict[str, Any]:
    owner: type[Any]
    if section == SIM:
        owner = SimConfig
    elif section == LIMITS:
        owner = Limits
    else:
        owner = ServerSettings
    defaults: dict[str, Any] = {}
    for f in fields(owner):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def default_of(knob: Knob) -> Any:
    if knob.name == "log_level":
        return "INFO"
    return _owner_defaults(knob.section).get(knob.name)


def describe_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple) and all(isinstance(v, Memblock) for v in value):
        return ",".join(f"{m.base:#x}:{m.size >> 20}M" for m in value)
    if hasattr(value, "value"):  # an enum
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _add(parser: argparse.ArgumentParser, knobs: Iterable[Knob], env: bool) -> None:
    for knob in knobs:
        also = f"; env {knob.env}" if env else ""
        text = f"{knob.help} (default {describe_default(default_of(knob))}{also})"
        if knob.name == "memblocks":
            parser.add_argument(knob.option, dest=knob.name, action="append",
                                metavar=knob.metavar, help=text)
        else:
            parser.add_argument(knob.option, dest=knob.name, metavar=knob.metavar, help=text)


def add_sim_arguments(
    parser: argparse.ArgumentParser, only: Iterable[str] | None = None, env: bool = False
) -> None:
    """The simulated machine's knobs as flags, all or `only` those named (serve, and any
    tool that builds a SimConfig: `SimConfig.from_mapping(vars(args))` takes them). With
    `env` the help names each knob's PKVM_SIM_* variable (serve reads them; others do not)."""
    wanted = None if only is None else set(only)
    _add(parser, (k for k in SIM_KNOBS if wanted is None or k.name in wanted), env)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, SERVICE_KNOBS, env=True)


def unknown_env_variables(environ: Iterable[str]) -> list[str]:
    """PKVM_SIM_* names in `environ` that are no knob (a typo would otherwise be silently
    ignored, where the same typo in a config file is an error)."""
    known = {knob.env for knob in ALL_KNOBS} | ENV_NOT_KNOBS
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def env_error(names: list[str]) -> str:
    """The one-line error for unknown PKVM_SIM_* variables, with the likely meant ones."""
    import difflib  # noqa: PLC0415

    known = sorted({knob.env for knob in ALL_KNOBS} | ENV_NOT_KNOBS)
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return (f"unknown environment variable{'s' if len(names) > 1 else ''}: {', '.join(parts)};"
            " `pkvm-sim serve --help` names every PKVM_SIM_* variable")


def parse_service_value(name: str, value: Any) -> Any:
    """A server or limit knob's value from a flag, a file or the environment (ValueError
    naming the knob when bad)."""
    knob = BY_NAME[name]
    assert knob.parse is not None
    try:
        return knob.parse(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{knob.option} / {name}: {error}") from None
