"""The gRPC-free settings module, and the one boolean parser every configuration source uses
(issue 21: `faithful_bugs = "yes please"` used to become False where a server boolean was an
error)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pkvm_sim import knobs, settings
from pkvm_sim.core.config import SimConfig


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), (" Yes ", True), ("ON", True), (True, True), (1, True),
    ("0", False), ("false", False), ("no", False), ("Off", False), (False, False), (0, False),
])
def test_booleans_that_parse(text: object, value: bool) -> None:
    assert settings.parse_bool(text) is value
    assert SimConfig.from_mapping({"faithful_bugs": text}).faithful_bugs is value


@pytest.mark.parametrize("text", ["yes please", "", "2", "nope", "truth", 2, 0.5])
def test_every_source_refuses_the_same_non_booleans(text: object) -> None:
    """A machine knob (SimConfig's faithful_bugs) and a server knob (metrics_per_vm) agree."""
    with pytest.raises(ValueError, match="true or false"):
        SimConfig.from_mapping({"faithful_bugs": text})
    with pytest.raises(ValueError, match="--metrics-per-vm / metrics_per_vm: must be true"):
        knobs.parse_service_value("metrics_per_vm", text)


def test_serve_refuses_a_non_boolean_faithful_bugs_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text('faithful_bugs = "yes please"\n')
    process = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--config", str(config),
         "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 2, process.stderr
    assert "yes please" in process.stderr


def test_knobs_and_settings_load_no_grpc() -> None:
    """Describing every knob (defaults from Limits and ServerSettings) and checking an
    address import nothing of gRPC: the offline tools stay light."""
    script = textwrap.dedent("""
        import sys
        from pkvm_sim import knobs
        for knob in knobs.ALL_KNOBS:
            knobs.default_of(knob)
        knobs.address("127.0.0.1:50051")
        knobs.parse_service_value("max_vms_per_client", "3")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "google")
                        or m.startswith("pkvm_sim.service"))
        print(",".join(loaded))
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, check=True)
    assert process.stdout.strip() == ""


def test_the_service_uses_the_settings_classes() -> None:
    from pkvm_sim.service import limits, server

    assert limits.Limits is settings.Limits
    assert server.ServerSettings is settings.ServerSettings
    assert server.split_host_port is settings.split_host_port
    assert knobs.boolean is settings.parse_bool
