"""Each cached kernel's own BTF against the profile that models it: `struct hyp_page` is the
size the profile's vmemmap layout says (what kvm_hyp_reserve multiplies by every page of RAM).

The images are the ones tests/kernel boots (scripts/fetch-kernels); nothing is booted here.
Expected sizes come from the sources: 4 bytes up to v6.13 (`u16 refcount; u16 order`,
"KVM: arm64: Reduce hyp_vmemmap overhead", v5.14), 8 bytes in 6.18 and 7.3
(`u16 refcount; u8 order; 4-bit host state; 4-bit hyp state; u32 host_share_guest_count`,
arch/arm64/kvm/hyp/include/nvhe/memory.h).
"""

from __future__ import annotations

import pytest
from pkvm_sim.core.layout import LAYOUTS
from pkvm_sim.core.profiles import profile_spec
from pkvm_sim.tools.kernel_btf import btf_blob, struct_sizes
from pkvm_sim.tools.kernel_check import DEFAULT_CACHE, KernelImage, load_manifest

from tests.unavailable import unavailable

# sizeof(struct hyp_page) by kernel series, read from each version's nvhe/memory.h
SOURCE_HYP_PAGE_BYTES = {"6.1": 4, "6.12": 4, "6.18": 8, "7.3": 8}


def _kernels() -> list[KernelImage]:
    kernels = load_manifest(DEFAULT_CACHE)
    if not kernels:
        unavailable(f"no kernels cached in {DEFAULT_CACHE}: run scripts/fetch-kernels")
    return kernels


def test_hyp_page_in_each_image_is_the_profile_layout_and_the_source_size() -> None:
    checked = []
    for kernel in _kernels():
        sizes = struct_sizes(kernel.image.read_bytes(), ["hyp_page"])
        layout = LAYOUTS[profile_spec(kernel.profile).default_layout]
        series = kernel.flavour.split("-")[0]
        assert sizes["hyp_page"] == layout.entry_bytes, (kernel.flavour, sizes, layout.name)
        if series in SOURCE_HYP_PAGE_BYTES:
            assert sizes["hyp_page"] == SOURCE_HYP_PAGE_BYTES[series], kernel.flavour
        checked.append(kernel.flavour)
    assert checked


def test_an_image_without_btf_is_refused() -> None:
    with pytest.raises(ValueError, match="no BTF"):
        btf_blob(b"\x9f\xeb\x01\x00" + b"\0" * 4096)  # a magic, but no plausible header
