"""The state file (core/state_file.py): exact round trips, refusals, atomic writes."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.profiles import Profile
from pkvm_sim.core.state_file import FORMAT_VERSION, HEADER, MAGIC, StateFileError
from pkvm_sim.core.state_values import STREAMS

from tests.core.machine_compare import Workload, _attributes, assert_same_machine

SMALL = ["0x80000000:256M"]
CONFIGS = {
    "v5.14": {"memblocks": SMALL},
    "v5.13-two-memblocks": {"profile": "v5.13", "memblocks": ["0x80000000:128M",
                                                             "0x100000000:128M"]},
    "carveout-coverage": {"memblocks": SMALL, "vmemmap_coverage": "carveout"},
    "layout-2-64K": {"memblocks": ["0x80000000:1G"], "hyp_page_layout": "2",
                     "page_size": "64K", "max_order_formula": "v5.17"},
    # every profile of the registry, so a profile added later is covered at once
    **{f"profile-{p.value}": {"profile": p.value, "memblocks": SMALL} for p in Profile},
}


def boot(values: dict[str, Any]) -> Hypervisor:
    return Hypervisor.boot(SimConfig.from_mapping(values))


def round_trip(hv: Hypervisor, service: dict[str, Any] | None = None) -> Hypervisor:
    return state_file.restore(state_file.decode(state_file.encode(hv, service)))


def driven(values: dict[str, Any], seed: int, steps: int) -> tuple[Hypervisor, Workload]:
    """A machine after a seeded workload, plus one VM that tries a bit of everything
    (blocks in both pools, shared and pinned pages, memcache, guest mappings). What the
    profile does not offer is refused and skipped."""
    hv = boot(values)
    workload = Workload(seed)
    workload.run(hv, steps)
    try:
        vm = hv.create_vm(nr_vcpus=2, slice_pages=32)
    except PkvmError as error:  # v6.18/v7.3: VMs at EL2 are not modelled yet
        assert error.reason == "NOT_MODELLED", error
        return hv, workload
    base = vm.slice_base_pfn
    steps_: list[Any] = [
        lambda: hv.alloc_pages(vm.handle, 1),
        lambda: hv.alloc_pages(vm.handle, 0, "vm"),
        lambda: hv.host_share(vm.handle, base, 4),
        lambda: hv.pin_shared(vm.handle, base + 1, 2),
        lambda: hv.topup_memcache(vm.handle, 6),
        *(lambda i=i: hv.guest_map(vm.handle, (0x4000_0000 << i) + i * 0x20_0000,
                                   base + 16 + i) for i in range(3)),
    ]
    for step in steps_:
        with contextlib.suppress(PkvmError):
            step()
    return hv, workload


def reached(hv: Hypervisor) -> set[str]:
    """Which kinds of state the machine holds (so the round trip is known to cover them)."""
    stats = hv.statistics()
    vms = list(hv._vms.values())
    kinds = {
        "vms": stats.nr_vms > 0,
        "shares": stats.shared_pages > 0,
        "pins": any(vm.pins for vm in vms),
        "memcache": any(vm.memcache for vm in vms),
        "guest tables": any(vm.mm is not None and vm.mm.allocated for vm in vms),
        "admitted pages": any(vm.admitted for vm in vms),
        "mmio": stats.host_stage2.faults_mmio > 0,
        "recycles": stats.host_stage2.mmio_recycles > 0,
        "hyp blocks": bool(hv._owners),
    }
    return {kind for kind, present in kinds.items() if present}


COVERED: dict[str, set[str]] = {}


@pytest.mark.parametrize("name", CONFIGS)
def test_restored_machine_equals_the_original_object_by_object(name: str) -> None:
    hv, _ = driven(CONFIGS[name], seed=7, steps=600)
    COVERED[name] = reached(hv)
    restored = round_trip(hv)
    assert_same_machine(hv, restored)
    assert restored.canonical_dump(host_tables=True) == hv.canonical_dump(host_tables=True)


def test_the_round_trips_covered_every_kind_of_state() -> None:
    """Whatever each profile offers, the configurations above together hold every kind."""
    if len(COVERED) < len(CONFIGS):  # run alone: drive the machines here
        for name, values in CONFIGS.items():
            COVERED.setdefault(name, reached(driven(values, seed=7, steps=600)[0]))
    union = set().union(*COVERED.values())
    assert union == {"vms", "shares", "pins", "memcache", "guest tables", "admitted pages",
                     "mmio", "recycles", "hyp blocks"}


def test_the_comparison_catches_state_the_file_would_forget() -> None:
    """The deep comparison is what makes the serialiser merge-safe: prove it can fail."""
    hv, _ = driven(CONFIGS["v5.14"], seed=3, steps=200)
    restored = round_trip(hv)
    restored.host_stage2.counters.faults_mmio += 1  # a counter the file dropped
    with pytest.raises(AssertionError, match=r"hv\.host_stage2\.counters\.faults_mmio"):
        assert_same_machine(hv, restored)
    restored = round_trip(hv)
    compiled_attrs = getattr(type(hv.host_stage2), "__mypyc_attrs__", None)
    if compiled_attrs is None:  # pure core: a field added by a later change
        hv.host_stage2.new_field = [1]  # type: ignore[attr-defined]
        with pytest.raises(AssertionError, match="attributes differ: \\['new_field'\\]"):
            assert_same_machine(hv, restored)
        del hv.host_stage2.new_field  # type: ignore[attr-defined]
    else:  # compiled: no attribute can be added at run time; the walker reads them all
        declared = {name for name in compiled_attrs if not name.startswith("__")}
        assert declared and declared <= set(_attributes(hv.host_stage2))
    restored = round_trip(hv)
    restored.hyp_pool._contents = dict(restored.physmem._contents)  # broken sharing
    with pytest.raises(AssertionError, match="shares"):
        assert_same_machine(hv, restored)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_workload_split_by_a_restore_gives_the_same_answers(seed: int) -> None:
    unbroken = boot(CONFIGS["v5.14"])
    answers = Workload(seed).run(unbroken, 700)

    hv = boot(CONFIGS["v5.14"])
    client = Workload(seed)
    split = client.run(hv, 350)
    hv = round_trip(hv)  # the server restarts; the client carries on
    split += client.run(hv, 350)

    assert split == answers
    assert hv.canonical_dump(host_tables=True) == unbroken.canonical_dump(host_tables=True)


def test_handles_are_never_reused_even_across_a_restore() -> None:
    hv = boot(CONFIGS["v5.14"])
    a = hv.create_vm(nr_vcpus=1, slice_pages=8)
    hv.destroy_vm(a.handle)
    b = hv.create_vm(nr_vcpus=1, slice_pages=8)
    assert (a.handle, b.handle) == (0x1000, 0x1001)
    assert a.vmid == b.vmid == 1  # the VM table slot (VMID) is reused, as in the kernel
    hv.destroy_vm(b.handle)
    hv = round_trip(hv)
    c = hv.create_vm(nr_vcpus=1, slice_pages=8)
    assert c.handle == 0x1002 and c.vmid == 1


def test_the_service_section_is_kept_verbatim() -> None:
    service = {"tokens": [[0x1000, "secret"]], "nested": {"a": [1, 2.5, None]}}
    decoded = state_file.decode(state_file.encode(boot(CONFIGS["v5.14"]), service))
    assert decoded.service == service and decoded.version == FORMAT_VERSION


# -- refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file() -> bytes:
    hv, _ = driven(CONFIGS["v5.14"], seed=5, steps=200)
    return state_file.encode(hv)


def reheader(payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    """A well-formed header (right length and checksum) over any payload."""
    return HEADER.pack(MAGIC, version, 0, len(payload), hashlib.sha256(payload).digest()) \
        + payload


def with_machine(data: bytes, edit: Any) -> bytes:
    """The file with its machine section edited, re-checksummed (so only audit can tell)."""
    return with_state(data, lambda decoded: edit(decoded.machine))


def with_state(data: bytes, edit: Any) -> bytes:
    """The file with its decoded state (JSON and integer streams) edited, re-packed."""
    decoded = state_file.decode(data)
    edit(decoded)
    return state_file.pack(state_file.Snapshot(decoded.machine, decoded.service,
                                                decoded.vmemmap, decoded.ints))


def list_positions(stream: list[int], count: int) -> list[int]:
    """Where the first `count` lists of a stream start (each is its length, then items)."""
    positions, pos = [], 0
    for _ in range(count):
        positions.append(pos)
        pos += 1 + stream[pos]
    return positions


def drop_last(stream: list[int], pos: int) -> None:
    """Remove the last item of the list that starts at `pos`."""
    del stream[pos + stream[pos]]
    stream[pos] -= 1


def _forget_an_owner(decoded: state_file.StateFile) -> None:
    records = decoded.ints["records"]  # first the owners: pfns, handles, pools
    for pos in reversed(list_positions(records, 3)):
        assert records[pos] >= 1
        drop_last(records, pos)


def test_a_good_file_decodes(good_file: bytes) -> None:
    assert good_file[:8] == MAGIC == b"PKVMSTAT"
    state_file.restore(state_file.decode(good_file))


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda d: d[:len(d) // 2], "truncated: the header announces"),
    (lambda d: d[:30], "truncated: 30 bytes"),
    (lambda d: b"", "empty file: not a pkvm-sim state file"),
    (lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "not a pkvm-sim state file"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "corrupt: the SHA-256 checksum"),
    (lambda d: d[:100] + bytes([d[100] ^ 0x40]) + d[101:], "corrupt: the SHA-256 checksum"),
    (lambda d: d + b"\0", "has trailing bytes"),
    (lambda d: reheader(d[HEADER.size:], FORMAT_VERSION + 1),
     f"format version {FORMAT_VERSION + 1} is a newer"),
    (lambda d: reheader(d[HEADER.size:], 0), "format version 0 is an older, unsupported"),
    (lambda d: reheader(b"\x07machine\x03\0\0\0\0\0\0\0abc"), "corrupt: cannot decode"),
    (lambda d: reheader(b""), "corrupt: cannot decode"),
])
def test_bad_files_are_refused_with_one_line(good_file: bytes, mangle: Any,
                                             message: str) -> None:
    with pytest.raises(StateFileError, match=message) as caught:
        state_file.restore(state_file.decode(mangle(good_file)))
    assert "\n" not in str(caught.value)


def test_a_state_that_fails_audit_is_refused(good_file: bytes) -> None:
    def leak_a_free_block(decoded: state_file.StateFile) -> None:
        pools = decoded.ints["pools"]  # first the hyp pool's free lists, order 0 first
        lists = list_positions(pools, decoded.machine["pools"]["hyp"]["max_order"])
        drop_last(pools, max(p for p in lists if pools[p]))  # the highest non-empty list

    for edit in (_forget_an_owner, leak_a_free_block):
        with pytest.raises(StateFileError, match="fails audit"):
            state_file.restore(state_file.decode(with_state(good_file, edit)))


@contextlib.contextmanager
def collections_counted() -> Any:
    """Counts the cyclic collections that start within the block (gc.callbacks)."""
    started: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield started
    finally:
        gc.callbacks.remove(count)


def test_a_restore_runs_at_most_one_cyclic_collection() -> None:
    """The collector is paused while a restore builds the machine. It would otherwise start
    a young collection every PYTHON_YOUNG_THRESHOLD new containers (Python's default; a
    server started earlier in this process raised it, so it is set here), and this restore
    builds several times that many; one may start when the collector resumes at the end."""
    hv = boot({"memblocks": ["0x80000000:1G"]})
    for _ in range(160):
        vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
        hv.alloc_pages(vm.handle, 0)
    decoded = state_file.decode(state_file.encode(hv))
    thresholds = gc.get_threshold()
    gc.set_threshold(PYTHON_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        gc.collect()
        before = len(gc.get_objects())
        with collections_counted() as started:
            restored = state_file.restore(decoded)
        built = len(gc.get_objects()) - before
    finally:
        gc.set_threshold(*thresholds)
    assert built > 3 * PYTHON_YOUNG_THRESHOLD  # a restore without the pause would start several
    assert len(started) <= 1
    assert gc.isenabled()
    del restored


PYTHON_YOUNG_THRESHOLD = 700  # gc.get_threshold()[0] of a fresh interpreter


@pytest.mark.parametrize("enabled", [True, False])
def test_snapshot_and_restore_leave_the_collector_as_they_found_it(good_file: bytes,
                                                                   enabled: bool) -> None:
    hv = state_file.restore(state_file.decode(good_file))
    try:
        if not enabled:
            gc.disable()
        state_file.snapshot(hv)
        assert gc.isenabled() is enabled
        state_file.restore(state_file.decode(good_file))
        assert gc.isenabled() is enabled
        with pytest.raises(StateFileError):  # a refusal resumes it too
            state_file.restore(state_file.decode(with_state(good_file, _forget_an_owner)))
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_inconsistent_states_are_refused(good_file: bytes) -> None:
    def other_config(machine: dict[str, Any]) -> None:
        machine["config"]["memblocks"] = [{"base": 0x8000_0000, "size": 512 << 20}]

    def unknown_knob(machine: dict[str, Any]) -> None:
        machine["config"]["warp_drive"] = True

    with pytest.raises(StateFileError, match="inconsistent machine state"):
        state_file.restore(state_file.decode(with_machine(good_file, other_config)))
    with pytest.raises(StateFileError, match="bad configuration.*warp_drive"):
        state_file.restore(state_file.decode(with_machine(good_file, unknown_knob)))


# -- files ---------------------------------------------------------------------------------


def test_save_is_atomic_and_private(tmp_path: Path, good_file: bytes) -> None:
    path = tmp_path / "machine.pkvm"
    hv = boot(CONFIGS["v5.14"])
    size = state_file.save(path, hv)
    assert path.stat().st_size == size and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["machine.pkvm"]

    hv.physmem.write(hv.hyp_pool.base_pfn, object())  # something no file can hold
    before = path.read_bytes()
    with pytest.raises(TypeError):
        state_file.save(path, hv)
    assert path.read_bytes() == before  # the old file is intact, no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["machine.pkvm"]


def test_load_never_writes(tmp_path: Path, good_file: bytes) -> None:
    path = tmp_path / "bad.pkvm"
    path.write_bytes(good_file[:1000])
    mtime = path.stat().st_mtime_ns
    with pytest.raises(StateFileError, match="truncated"):
        state_file.load(path)
    assert path.read_bytes() == good_file[:1000] and path.stat().st_mtime_ns == mtime
    with pytest.raises(StateFileError, match="cannot read"):
        state_file.load(tmp_path / "missing.pkvm")


def test_sections_are_zlib_streams_in_the_documented_order(good_file: bytes) -> None:
    """docs/state-file.md: a reader in another language can walk the sections."""
    payload = good_file[HEADER.size:]
    names = []
    offset = 0
    while offset < len(payload):
        n = payload[offset]
        names.append(payload[offset + 1:offset + 1 + n].decode())
        offset += 1 + n
        length = int.from_bytes(payload[offset:offset + 8], "little")
        zlib.decompress(payload[offset + 8:offset + 8 + length])
        offset += 8 + length
    assert names == ["machine", "service", *(f"ints/{name}" for name in STREAMS), "vmemmap/0"]
    assert os.path.basename("x") == "x"


# -- a committed file of format version 1 ----------------------------------------------------

V1_FILE = Path(__file__).resolve().parents[1] / "data" / "state" / "v1-small.pkvm"


def test_a_committed_version_1_file_still_restores() -> None:
    """tests/data/state/v1-small.pkvm was written by the first version of the format and is
    never regenerated: every later pkvm-sim must restore it (or refuse it by its version).
    Its machine holds only what every model version agrees on (host-level state, VMs as
    slices): a 256 MiB v5.14 machine with vmemmap coverage 'carveout', where VM 0x1000
    ("kept", 2 vCPUs, 64-page slice) allocated an order-2 hyp-pool block and took a second
    reference on it; VM 0x1001 (8 pages) was created and destroyed; VM 0x1002 (16 pages)
    allocated one page; the host took an MMIO fault at 256 MiB and memory faults at
    0x8000_0000 and 0x8800_0000."""
    decoded = state_file.load(V1_FILE)
    assert decoded.version == 1
    assert_the_small_machine(decoded)


V2_FILE = V1_FILE.with_name("v2-small.pkvm")


def test_a_committed_version_2_file_still_restores() -> None:
    """tests/data/state/v2-small.pkvm is v1-small.pkvm restored and saved by the first
    writer of format version 2 (the same machine and service section); never regenerated."""
    decoded = state_file.load(V2_FILE)
    assert decoded.version == 2 and set(decoded.ints) == set(STREAMS)
    assert_the_small_machine(decoded)


def assert_the_small_machine(decoded: state_file.StateFile) -> None:
    assert decoded.service["tokens"] == [[0x1000, "token-a"], [0x1002, "token-b"]]
    hv = state_file.restore(decoded)
    assert hv.config.vmemmap_coverage == "carveout" and hv.config.profile.value == "v5.14"
    assert [v.handle for v in hv.vms()] == [0x1000, 0x1002]
    kept, second = hv.vm(0x1000), hv.vm(0x1002)
    assert (kept.name, kept.nr_vcpus, kept.slice_nr_pages) == ("kept", 2, 64)
    # first fit from the bottom of RAM (the carve-out is at the top): 0x1001's 8 pages came
    # back and merged, so 0x1002's 16 pages start right after 0x1000's 64
    assert (kept.slice_base_pfn, second.slice_base_pfn) == (0x80000, 0x80040)
    assert second.vmid == 2  # the destroyed VM's slot was reused, not its handle
    held = {h: pfn for pfn, (h, _kind) in hv._owners.items()}
    assert (hv.page_info(held[0x1000]).refcount, hv.page_info(held[0x1000]).order) == (2, 2)
    assert (hv.page_info(held[0x1002]).refcount, hv.page_info(held[0x1002]).order) == (1, 0)
    counters = hv.statistics().host_stage2
    assert (counters.faults_mmio, counters.faults_memory) == (1, 2)
    assert hv.put_page(0x1000, held[0x1000]) == 1
    created = hv.create_vm(nr_vcpus=1, slice_pages=4)
    assert (created.handle, created.vmid) == (0x1003, 3)

def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "machine.pkvm"
    hv = boot(CONFIGS["v5.14"])
    state_file.save(path, hv)
    before = path.read_bytes()
    hv.create_vm(nr_vcpus=1, slice_pages=4)

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.os, "replace", crash)  # the data is written, not renamed
    with pytest.raises(OSError, match="No space"):
        state_file.save(path, hv)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["machine.pkvm"]


def _file_of_removed_profile(hv: Hypervisor, name: str) -> state_file.StateFile:
    """hv's state file as a pkvm-sim that still had profile `name` would have written it."""
    snap = state_file.snapshot(hv)
    snap.machine["config"]["profile"] = name
    return state_file.decode(state_file.pack(snap))


def test_a_file_of_the_removed_guest_share_profile_restores_as_v6_12_with_a_note() -> None:
    """v6.12+guest-share was v6.12's machine (4-byte hyp_page, same reservation) plus guest
    sharing; a file that holds no guest share or memcache page is a v6.12 machine."""
    hv = boot({"profile": "v6.12", "memblocks": SMALL})
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8)
    hv.host_share(vm.handle, vm.slice_base_pfn, 2)
    decoded = _file_of_removed_profile(hv, "v6.12+guest-share")
    restored = state_file.restore(decoded)
    assert restored.config.profile is Profile.V6_12
    assert restored.canonical_dump(host_tables=True) == hv.canonical_dump(host_tables=True)
    assert len(decoded.notes) == 1
    assert "v6.12+guest-share was removed" in decoded.notes[0]
    assert "restored as v6.12" in decoded.notes[0]


def test_a_file_of_the_removed_profile_with_guest_shares_is_refused_naming_why() -> None:
    """Guest shares cannot exist in v6.12: such a file is refused, never half restored."""
    hv = boot({"profile": "v5.14", "memblocks": SMALL})  # serves guest maps (extension)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8)
    hv.topup_memcache(vm.handle, 4)
    hv.guest_map(vm.handle, 0, vm.slice_base_pfn)
    decoded = _file_of_removed_profile(hv, "v6.12+guest-share")
    with pytest.raises(StateFileError, match="guest shares or memcache pages.*cannot be"):
        state_file.restore(decoded)


V1_V6_12_FILE = Path(__file__).resolve().parents[1] / "data" / "state" / "v1-v6.12-guest-share.pkvm"


def test_the_committed_old_guest_share_file_is_refused_naming_why() -> None:
    """tests/data/state/v1-v6.12-guest-share.pkvm was written by pkvm-sim before EL2's boot
    stage-1 was modelled, by the removed v6.12+guest-share profile: VM "old-b" topped up 4
    memcache pages and mapped a page for its guest, which v6.12 cannot have. It is refused
    with the reason, not half restored."""
    decoded = state_file.load(V1_V6_12_FILE)
    with pytest.raises(StateFileError, match="v6.12\\+guest-share was removed.*guest shares or"
                       " memcache pages"):
        state_file.restore(decoded)


# -- byte-identical files ---------------------------------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "state" / "golden-sha256.json"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_file_bytes_are_those_of_the_format_s_first_writer(name: str) -> None:
    """tests/data/state/golden-sha256.json holds the SHA-256 of the file each configuration's
    driven machine (seed 7, 600 steps) gave with the first writer of format version 2 (pure
    core; version 1's were replaced with the format, docs/state-file.md). The same state
    must keep giving the same bytes, in both flavours: a diff of two saves and the checksum
    rely on that, and a change of bytes means a new format version."""
    expected = json.loads(GOLDEN.read_text())
    hv, _ = driven(CONFIGS[name], seed=7, steps=600)
    data = state_file.encode(hv, {"tokens": [[1, "t"]]})
    assert hashlib.sha256(data).hexdigest() == expected[name]


def test_every_guest_vm_field_is_in_its_state() -> None:
    """GuestVm.state() names its fields one by one (fast): a field added to the dataclass
    must be added there too, or a save would drop it."""
    from dataclasses import fields

    from pkvm_sim.core.guest import _FIELD_NAMES, _PACKED_FIELDS, GuestVm
    from pkvm_sim.core.state_values import IntsIn

    declared = [f.name for f in fields(GuestVm) if f.name not in ("pool", "pgt", "mm")]
    assert list(_FIELD_NAMES) == declared
    vm = GuestVm(handle=0x1000, vmid=1, name="x", nr_vcpus=1, slice_base_pfn=0,
                 slice_nr_pages=1, memcache=[5, 6], hyp_memcache=[7], admitted=[8],
                 shared={3, 1}, pins={1: 2}, struct_pfns=[9], ran=True)
    out: list[int] = []
    json_fields = [name for name in declared if name not in _PACKED_FIELDS]
    state = vm.state(out)
    assert list(state) == [*json_fields, "pool", "pgd_pfns", "tables_allocated"]
    # lists as length, items; the pins as the list of pfns, then the list of counts
    assert out == [2, 5, 6, 1, 7, 1, 8, 2, 1, 3, 1, 1, 1, 2, 1, 9]
    assert GuestVm.from_state(state, IntsIn("vms", out)) == vm


# -- version 2's packed sections ----------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"",
    bytes(3000),  # all zero: no chunk stored
    bytes(1024) + b"\x01" + bytes(1022) + b"\x02" + bytes(100) + b"\x03",  # short last chunk
    bytes(range(256)) * 9,  # every chunk stored
])
def test_a_sparse_vmemmap_section_gives_back_the_raw_entries(raw: bytes) -> None:
    chunk = state_file.VMEMMAP_CHUNK_BYTES
    sparse = state_file.sparse_vmemmap(raw)
    nonzero_chunks = sum(1 for i in range(0, len(raw), chunk) if any(raw[i:i + chunk]))
    head = state_file.VMEMMAP_HEAD.unpack_from(sparse)
    assert head == (len(raw), chunk, nonzero_chunks)
    assert state_file.dense_vmemmap(sparse) == raw


@pytest.mark.parametrize("raw", [
    bytes(1024) + b"\x01" + bytes(1022) + b"\x02" + bytes(100) + b"\x03",  # short last chunk
    bytes(range(256)) * 9,  # every chunk stored
    bytes(5000) + b"\x07" + bytes(3000),  # one chunk stored, in the middle
])
def test_a_sparse_section_gives_any_range_of_its_raw_bytes(raw: bytes) -> None:
    """What a restore reads (one vmemmap chunk's range at a time): every range, inside a
    stored chunk, across stored and absent ones, at the short end; None when all zero."""
    sparse = state_file.read_sparse_vmemmap(state_file.sparse_vmemmap(raw))
    assert len(sparse) == len(raw)
    edges = sorted({0, 1, 700, 1023, 1024, 1025, 2047, 2048, 3000, 4999, 5001, len(raw) - 1,
                    len(raw)} & set(range(len(raw) + 1)))
    for start in edges:
        for stop in (e for e in edges if e >= start):
            span = sparse.span(start, stop)
            if span is None:
                assert not any(raw[start:stop]), (start, stop)
            else:
                assert span == raw[start:stop], (start, stop)


@pytest.mark.parametrize(("edit", "says"), [
    (lambda s: s[:-1], "chunks hold"),
    (lambda s: s + b"\0", "chunks hold"),
    # the chunk index (u64 right after the head) pointing past the segment
    (lambda s: s[:24] + (99).to_bytes(8, "little") + s[32:], "not increasing indices"),
])
def test_a_sparse_vmemmap_section_that_does_not_add_up_is_refused(edit: Any,
                                                                   says: str) -> None:
    sparse = state_file.sparse_vmemmap(bytes(2048) + b"\x01" + bytes(1023))
    assert state_file.dense_vmemmap(sparse)[2048] == 1
    with pytest.raises(ValueError, match=says):
        state_file.dense_vmemmap(edit(sparse))


@pytest.mark.parametrize("raw_bytes", [2**64 - 1, 2**40, 8])
def test_a_sparse_vmemmap_of_the_wrong_length_is_refused(good_file: bytes,
                                                         raw_bytes: int) -> None:
    """A re-checksummed file whose vmemmap section announces another length (any u64, no
    chunk stored): refused in one line, nothing allocated for the announced length."""
    payload, offset, sections = good_file[HEADER.size:], 0, []
    while offset < len(payload):
        n = payload[offset]
        name = payload[offset + 1:offset + 1 + n].decode()
        offset += 1 + n
        length = int.from_bytes(payload[offset:offset + 8], "little")
        sections.append((name, zlib.decompress(payload[offset + 8:offset + 8 + length])))
        offset += 8 + length
    sections = [(name, state_file.VMEMMAP_HEAD.pack(raw_bytes, 1024, 0)
                 if name == "vmemmap/0" else data) for name, data in sections]
    bad = reheader(b"".join(state_file._section(name, data) for name, data in sections))
    with pytest.raises(state_file.StateFileError, match="inconsistent machine state") as error:
        state_file.restore(state_file.decode(bad))
    assert "\n" not in str(error.value)


def test_a_stream_with_values_left_over_is_refused(good_file: bytes) -> None:
    def append_to_vms(decoded: state_file.StateFile) -> None:
        decoded.ints["vms"].append(0)

    with pytest.raises(StateFileError, match="inconsistent machine state.*ints/vms: 1 values"
                       " left over"):
        state_file.restore(state_file.decode(with_state(good_file, append_to_vms)))
