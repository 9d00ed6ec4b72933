"""`pkvm-sim serve` configuration: defaults < file < environment < flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.layout import Profile
from pkvm_sim.service import serve


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_quick_start() -> None:
    config, server = serve.resolve(parse(), environ={})
    assert config == SimConfig() and server == {}
    settings = serve.settings_from(server)
    assert settings.listen == "127.0.0.1:50051" and settings.metrics_listen == "127.0.0.1:9100"


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "pkvm.toml"
    path.write_text(
        'profile = "v5.13"\nnr_cpus = 4\nia_bits = 44\n'
        'memblocks = ["0x80000000:2G", "0x880000000:6G"]\n'
        '[server]\nlisten = "127.0.0.1:6000"\nworkers = 4\n'
    )
    env = {"PKVM_SIM_NR_CPUS": "16", "PKVM_SIM_LISTEN": "127.0.0.1:7000",
           "PKVM_SIM_PAGE_SIZE": "16K"}
    config, server = serve.resolve(
        parse("--config", str(path), "--page-size", "4K", "--metrics-listen", "off"), environ=env
    )
    assert config.profile is Profile.V5_13 and config.ia_bits == 44  # file
    assert config.nr_cpus == 16  # env over file
    assert config.page_size == 4096  # flag over env
    assert config.memblocks == (Memblock(0x8000_0000, 2 << 30), Memblock(0x8_8000_0000, 6 << 30))
    settings = serve.settings_from(server)
    assert settings.listen == "127.0.0.1:7000" and settings.workers == 4
    assert settings.metrics_listen is None


def test_env_memblocks_and_flags() -> None:
    config, _ = serve.resolve(
        parse("--hyp-pool-extra-pages", "64", "--faithful-bugs", "true"),
        environ={"PKVM_SIM_MEMBLOCKS": "0x80000000:4G, 0x880000000:6G"},
    )
    assert len(config.memblocks) == 2 and config.hyp_pool_extra_pages == 64
    assert config.faithful_bugs
    config, _ = serve.resolve(parse("--memblock", "0x40000000:1G", "--memblock", "0x80000000:1G"),
                              environ={})
    assert [b.size for b in config.memblocks] == [1 << 30, 1 << 30]


def test_unknown_file_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("no_such_knob = 1\n")
    with pytest.raises(ValueError, match="no_such_knob"):
        serve.resolve(parse("--config", str(path)), environ={})


def test_vm_lease_settings(tmp_path: Path) -> None:
    settings = serve.settings_from(serve.resolve(parse(), environ={})[1])
    assert settings.vm_lease_seconds == 600 and settings.max_vm_lease_seconds == 86400
    assert settings.lease_check_interval is None
    path = tmp_path / "pkvm.toml"
    path.write_text("[server]\nvm_lease_seconds = 30\nmax_vm_lease_seconds = 3600\n")
    _, server = serve.resolve(parse("--config", str(path)), environ={})
    settings = serve.settings_from(server)
    assert (settings.vm_lease_seconds, settings.max_vm_lease_seconds) == (30, 3600)
    _, server = serve.resolve(
        parse("--config", str(path), "--vm-lease-seconds", "0"),
        environ={"PKVM_SIM_VM_LEASE_SECONDS": "45", "PKVM_SIM_MAX_VM_LEASE_SECONDS": "7200"},
    )
    settings = serve.settings_from(server)
    assert (settings.vm_lease_seconds, settings.max_vm_lease_seconds) == (0, 7200)
    for bad in ({"vm_lease_seconds": "100", "max_vm_lease_seconds": "10"},
                {"vm_lease_seconds": "-1"}, {"max_vm_lease_seconds": "soon"}):
        with pytest.raises(ValueError):
            serve.settings_from(bad)


def test_every_knob_is_declared_once_with_its_owners_default() -> None:
    from dataclasses import fields

    from pkvm_sim import knobs
    from pkvm_sim.service.limits import Limits
    from pkvm_sim.service.server import ServerSettings

    names = [knob.name for knob in knobs.ALL_KNOBS]
    assert len(names) == len(set(names))
    assert {f.name for f in fields(SimConfig)} == {k.name for k in knobs.SIM_KNOBS}
    assert {f.name for f in fields(Limits)} == {
        k.name for k in knobs.SERVICE_KNOBS if k.section == knobs.LIMITS}
    settings = {f.name for f in fields(ServerSettings)}
    assert {k.name for k in knobs.SERVER_KNOBS} - settings == {"log_level", "state_file"}
    helps = {action.dest: action.help for action in _parser()._actions}
    # The help text shows the defaults of the dataclasses that own the knobs.
    # The help text shows the defaults of the dataclasses that own the knobs, and the
    # environment variable serve reads for each.
    assert "(default 8; env PKVM_SIM_NR_CPUS)" in helps["nr_cpus"] and SimConfig().nr_cpus == 8
    assert f"(default {Limits().quota_hyp_pages}; env PKVM_SIM_QUOTA_HYP_PAGES)" in \
        helps["quota_hyp_pages"]
    assert f"(default {ServerSettings().listen}; env PKVM_SIM_LISTEN)" in helps["listen"]


def test_an_unknown_environment_variable_is_refused_like_an_unknown_file_key() -> None:
    with pytest.raises(ValueError, match=r"PKVM_SIM_NR_CPU \(did you mean PKVM_SIM_NR_CPUS\?\)"):
        serve.resolve(parse(), environ={"PKVM_SIM_NR_CPU": "4"})
    # the config file's and the project's other tools' variables are not knobs, and pass
    config, _ = serve.resolve(parse(), environ={"PKVM_SIM_IMAGE": "x", "PKVM_SIM_NR_CPUS": "4",
                                                "PKVM_SIM_KERNEL_CACHE": "/tmp"})
    assert config.nr_cpus == 4


def test_a_tool_can_take_a_subset_of_the_machine_knobs() -> None:
    from pkvm_sim.knobs import add_sim_arguments

    parser = argparse.ArgumentParser()
    add_sim_arguments(parser, only=("memblocks", "page_size"))
    args = parser.parse_args(["--memblock", "0x80000000:1G", "--page-size", "16K"])
    config = SimConfig.from_mapping({k: v for k, v in vars(args).items() if v is not None})
    assert config.page_size == 16384 and config.memblocks[0].size == 1 << 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser
