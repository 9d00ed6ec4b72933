"""`pkvm-sim reserve`, driven in-process through add_arguments() + run().

Expected values come from SEMANTICS 1.6 (examples A and B) and 1.2.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
from pkvm_sim.tools import reserve

MIB = 1 << 20
SIX_KEYS = {
    "hyp_s1_pgtable_pages",
    "host_s2_pgtable_pages",
    "vmemmap_pages",
    "hyp_mem_pages",
    "reserved_bytes",
    "vmemmap_bytes_per_gib",
}
EXAMPLE_B_FLAGS = ["--memblock", "0x8000_0000:2G", "--memblock", "0x8_8000_0000:6G"]


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Register the subcommand as the shared dispatcher does, then run it."""
    parser = argparse.ArgumentParser(prog="pkvm-sim")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("reserve")
    reserve.add_arguments(sub)
    sub.set_defaults(func=reserve.run)
    args = parser.parse_args(["reserve", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_example_a_has_exactly_the_six_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--json"], capsys)
    assert code == 0
    figures = json.loads(out)
    assert set(figures) == SIX_KEYS
    assert figures == {
        "hyp_s1_pgtable_pages": 2569,
        "host_s2_pgtable_pages": 2585,
        "vmemmap_pages": 10,
        "hyp_mem_pages": 5164,
        "reserved_bytes": 22 * MIB,
        "vmemmap_bytes_per_gib": 1 * MIB,
    }


def test_json_example_a_v13(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--json", "--profile", "v5.13"], capsys)
    assert code == 0
    figures = json.loads(out)
    assert (figures["host_s2_pgtable_pages"], figures["vmemmap_pages"]) == (2070 + 515, 45)
    assert (figures["hyp_mem_pages"], figures["vmemmap_bytes_per_gib"]) == (5199, 8 * MIB)


def test_json_example_b_with_explicit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "--page-size", "4K", "--hyp-page-layout", "4", *EXAMPLE_B_FLAGS]
    code, out, _ = invoke(argv, capsys)
    assert code == 0
    figures = json.loads(out)
    assert (figures["hyp_mem_pages"], figures["reserved_bytes"]) == (9276, 38 * MIB)


def test_json_64k_reserves_512_mib(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--json", "--page-size", "64K"], capsys)
    assert code == 0
    assert json.loads(out)["hyp_mem_pages"] == 53
    assert json.loads(out)["reserved_bytes"] == 512 * MIB


def test_human_table_shows_the_layout_in_hex(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke([], capsys)
    assert code == 0
    for text in (
        "0x1_7EA0_0000",
        "0x1_7EA0_6000",
        "0x1_7F40_F000",
        "0x1_7FE2_8000",
        "22 MiB",
        "5164",
        "host_s2",
    ):
        assert text in out


def test_human_table_v13_example_b(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--profile", "v5.13", *EXAMPLE_B_FLAGS], capsys)
    assert code == 0
    for text in (
        "0x9_FDA0_0000",
        "0x9_FDA4_C000",
        "0x9_FEC5_B000",
        "0x9_FFC7_7000",
        "0x9_FFE7_A000",
        "host_s2_mem",
        "host_s2_dev",
        "38 MiB",
    ):
        assert text in out


def test_hyp_pool_extra_pages_shows_in_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--json", "--hyp-pool-extra-pages", "1000"], capsys)
    assert code == 0
    assert json.loads(out)["hyp_s1_pgtable_pages"] == 2569 + 1000


def test_compare_mentions_both_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--compare"], capsys)
    assert code == 0
    assert "v5.13" in out and "v5.14" in out
    assert "8 MiB/GiB" in out and "1 MiB/GiB" in out
    assert "5199" in out and "5164" in out and "-35" in out  # hyp_mem_pages and the saving


def test_compare_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--compare", "--json", *EXAMPLE_B_FLAGS], capsys)
    assert code == 0
    both = json.loads(out)
    assert set(both) == {"v5.13", "v5.14"}
    assert set(both["v5.13"]) == set(both["v5.14"]) == SIX_KEYS
    assert (both["v5.13"]["vmemmap_pages"], both["v5.14"]["vmemmap_pages"]) == (77, 14)


def test_compare_notes_an_ignored_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = invoke(["--compare", "--hyp-page-layout", "2"], capsys)
    assert code == 0
    assert "ignored" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--profile", "v5.99"],
        ["--page-size", "8K"],
        ["--hyp-page-layout", "16"],
        ["--vmemmap-coverage", "some"],
        ["--memblock", "nonsense"],
        ["--memblock", "0x8000_0000:1M"],  # no room for the carve-out
        ["--carveout-base", "0x1_0000_0800"],  # not page aligned
        ["--hyp-pool-extra-pages", "-1"],
    ],
)
def test_bad_configuration_exits_2_on_stderr(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = invoke(argv, capsys)
    assert code == 2
    assert out == ""
    assert "error" in err


def test_129_memblocks_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv: list[str] = []
    for i in range(129):
        argv += ["--memblock", f"{0x8000_0000 + i * 4 * MIB:#x}:2M"]
    code, _, err = invoke(argv, capsys)
    assert code == 2
    assert "128" in err


def test_standalone_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert reserve.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hyp_mem_pages"] == 5164


def test_compare_any_profiles_text(capsys: pytest.CaptureFixture[str]) -> None:
    """64 GiB at 0x4000_0000: what the Debian 6.1 and 6.12 kernels reserved when booted
    (262 and 326 MiB, tests/kernel), v5.14 = v6.1, and v6.12's 16384 vmemmap pages
    (64 GiB of 4-byte entries) and 11 FF-A pages."""
    code, out, _ = invoke(
        ["--compare", "v5.13,v5.14,v6.1,v6.12", "--memblock", "0x40000000:64G"], capsys
    )
    assert code == 0
    assert out.splitlines()[0].startswith("v5.13 vs v5.14 vs v6.1 vs v6.12: 64 GiB")
    reserved = next(line for line in out.splitlines() if line.startswith("reserved"))
    assert reserved.split()[3:9] == ["262", "MiB", "262", "MiB", "326", "MiB"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["vmemmap_pages"][3] == "16384"
    assert rows["ffa_proxy_pages"][:4] == ["0", "0", "0", "11"]
    assert rows["vm_table_pages"][:4] == ["0", "0", "0", "1"]


def test_compare_any_profiles_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--compare", "v6.1,v6.12", "--json", "--memblock", "0x40000000:4G"],
                          capsys)
    assert code == 0
    both = json.loads(out)
    assert list(both) == ["v6.1", "v6.12"]
    code, out, _ = invoke(["--compare", "all", "--json"], capsys)
    assert code == 0 and list(json.loads(out)) == ["v5.13", "v5.14", "v6.1", "v6.12", "v6.18",
                                                    "v7.3"]
    code, out, _ = invoke(["--compare", "v6.1,v6.12", "--json", "--memblock", "0x40000000:4G"],
                          capsys)
    both = json.loads(out)
    assert (both["v6.1"]["reserved_bytes"] >> 20, both["v6.12"]["reserved_bytes"] >> 20) == (22, 26)


@pytest.mark.parametrize("value", ["v5.14", "v5.14,v5.14", "v5.14,v4.19"])
def test_compare_needs_two_known_profiles(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = invoke(["--compare", value], capsys)
    assert (code, out) == (2, "")
    assert "error" in err


def test_64k_v6_figures_say_they_are_unchecked(capsys: pytest.CaptureFixture[str]) -> None:
    """Debian builds no 64K arm64 kernel (docs/model.md): the figure says so."""
    code, out, _ = invoke(["--profile", "v6.12", "--page-size", "64K"], capsys)
    assert code == 0 and "unchecked" in out
    code, out, _ = invoke(["--profile", "v6.12", "--page-size", "16K"], capsys)
    assert code == 0 and "unchecked" not in out and "checked against" in out


def test_reserve_and_serve_share_one_declaration_of_the_machine_flags() -> None:
    """Issue 7 item 9: the knobs are declared once (pkvm_sim/knobs.py); reserve's flags are a
    subset of serve's, with the same option strings and help text."""
    from pkvm_sim.service import serve

    def helps(add: object) -> dict[str, str | None]:
        parser = argparse.ArgumentParser()
        add(parser)  # type: ignore[operator]
        return {opt: action.help for action in parser._actions for opt in action.option_strings}

    reserve_flags, serve_flags = helps(reserve.add_arguments), helps(serve.add_arguments)
    machine = {"--memblock", "--profile", "--page-size", "--hyp-page-layout",
               "--vmemmap-coverage", "--carveout-base", "--hyp-pool-extra-pages"}
    assert machine <= set(reserve_flags)
    # serve's help adds the knob's environment variable, which only serve reads.
    for flag in machine:
        env = serve_flags[flag]
        assert env is not None and re.search(r"; env PKVM_SIM_[A-Z_]+\)$", env), env
        assert re.sub(r"; env PKVM_SIM_[A-Z_]+\)$", ")", env) == reserve_flags[flag]


def test_reserve_loads_no_grpc() -> None:
    import subprocess
    import sys

    code = ("import sys; from pkvm_sim.cli import main; "
            "main(['reserve', '--memblock', '0x80000000:1G', '--json']); "
            "print('grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("False")
