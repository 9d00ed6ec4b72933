"""What EL2 maps in its own stage-1 at boot, and where (v6.1, v6.12).

`__pkvm_init` -> `recreate_hyp_mappings` (arch/arm64/kvm/hyp/nvhe/setup.c) rebuilds EL2's
stage-1 with the early allocator running over the hyp pool's own region (`hyp_pgt_base`);
`__pkvm_init_finalise` then starts the hyp pool with those pages reserved
(`hyp_pool_init(..., hyp_early_alloc_nr_used_pages())`). So every table of the boot stage-1,
the PGD included, is a page the hyp pool never hands out. In the kernel's order:

    mapping                        hyp VA                          granule    v6.1   v6.12
    -----------------------------  ------------------------------  ---------  -----  -----
    the idmap page                 = its PA (hyp_create_idmap)     blocks ok  yes    yes
    the vmemmap (1)                private quarter, upper half     blocks ok  yes    yes
    hyp text, rodata, bss          linear alias of the image       page       yes    yes
    the carve-out                  linear alias                    page       yes    yes
    per CPU: per-CPU area          linear alias                    page       yes    yes
    per CPU: stack (guard + page)  private range, 2-page aligned   page       yes    yes
    per CPU: host SVE state        linear alias                    page       -      if SVE
    host rodata, host bss tail     linear alias                    page       yes    -
    kvm_vgic_global_state          linear alias                    page       -      yes
    per CPU: the fixmap slot (2)   private range                   page       -      yes

(1) v6.1 the carve-out's slice, v6.12 every memblock's. (2) hyp_create_pcpu_fixmap, after
hyp_pool_init: its tables come from the hyp pool.

"Page": `pkvm_create_mappings_locked` maps one page at a time, so those ranges never get
block mappings; the idmap and vmemmap go through `kvm_pgtable_hyp_map` with the whole
range, which uses a block where VA and PA are both aligned (`kvm_block_mapping_supported`).

The hyp VA layout (`hyp_create_idmap`, arch/arm64/kvm/va_layout.c `kvm_compute_layout`): the
linear alias is PA - memstart_addr in the half of the VA space opposite to the idmap (bits above
the RAM span are a random tag, which keeps every 1 GiB and 2 MiB window of the alias aligned as
in PA; the half is chosen by bit vabits_actual - 1, the kernel's own VA size); the private
range starts at BIT(hyp_va_bits - 2) and the vmemmap at BIT(hyp_va_bits - 2) |
BIT(hyp_va_bits - 3), for an idmap below both. hyp_va_bits = max(IDMAP_VA_BITS 48,
vabits_actual) (kvm_mmu_init); vabits_actual is the build's VA_BITS when the CPU has LPA2
(52-bit builds), else its 48-bit (4K) or 47-bit (16K) fallback.

Where the kernel image and the host's KVM allocations sit is a property of the machine and the
build: `KernelImage` holds the section offsets of one Debian build (read from its kallsyms), and
`SimConfig.kernel_image_base` / `kvm_percpu_base` say where the image and the per-CPU
allocations of `init_hyp_mode` are in PA (defaults: QEMU virt's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .layout import ceil_div

if TYPE_CHECKING:
    from .config import SimConfig

MIB = 1 << 20
GIB = 1 << 30
IDMAP_VA_BITS = 48


@dataclass(frozen=True)
class KernelImage:
    """The parts of one kernel build that EL2 maps at boot (byte offsets from `_text`)."""

    name: str  # the build, e.g. 'linux-image-6.12.117+deb13-arm64'
    kernel_va_bits: int  # vabits_actual without LPA2
    kernel_va_bits_lpa2: int  # vabits_actual on a CPU with LPA2
    idmap: tuple[int, int]  # __hyp_idmap_text_start, __hyp_idmap_text_end
    hyp_sections: tuple[tuple[int, int], ...]  # hyp text, rodata, bss
    host_sections: tuple[tuple[int, int], ...]  # host data EL2 maps read-only
    nvhe_percpu_bytes: int  # __kvm_nvhe___per_cpu_end - __kvm_nvhe___per_cpu_start
    sve_state_bytes: int = 0  # pkvm_host_sve_state_size() on QEMU's max CPU (0: not mapped)
    fixmap: bool = False  # hyp_create_pcpu_fixmap (v6.2+)
    vmemmap_all_memory: bool = False  # hyp_back_vmemmap of every memblock (v6.2+)
    # -- what a VM costs (sizes from the build's BTF) --------------------------------------
    kvm_bytes: int = 0  # sizeof(struct kvm): kvm_share_hyp at KVM_CREATE_VM
    kvm_vcpu_bytes: int = 0  # sizeof(struct kvm_vcpu): kvm_share_hyp at KVM_CREATE_VCPU
    hyp_vm_bytes: int = 0  # PKVM_HYP_VM_SIZE, sizeof(struct pkvm_hyp_vm) (v6.2+)
    hyp_vcpu_bytes: int = 0  # PKVM_HYP_VCPU_SIZE, sizeof(struct pkvm_hyp_vcpu) (v6.2+)
    shares_task_fpsimd: bool = False  # kvm_arch_vcpu_run_map_fp shares the task's FP state
    # -- v6.16+ (mem_protect.c, pkvm.c) ------------------------------------------------------
    # __pkvm_host_share_hyp maps the page at EL2 (up to v6.15); from v6.16 it only records the
    # states in the hyp_page, and hyp_pin_shared_mem maps (the first pin) instead.
    share_maps_at_el2: bool = True
    # The hyp VM table slot is taken at KVM_CREATE_VM (pkvm_init_host_vm -> __pkvm_reserve_vm,
    # 6.18+ builds, seen on 6.18.15 and 7.3.4), not at the first KVM_RUN (__pkvm_init_vm).
    vm_slot_at_create: bool = False
    # Non-protected guests' stage-2 is EL2's (v6.14+): the guest's first fault shares the page
    # with __pkvm_host_share_guest after the host topped up the vCPU memcache.
    guest_stage2_at_el2: bool = False
    # kvm_compute_layout picks the linear alias's half by bit hyp_va_bits - 1 (7.3:
    # kvm_hyp_va_bits()) instead of vabits_actual - 1 (up to 6.18); they differ when the
    # kernel's VA size is below 48 bits (16K pages without LPA2: 47).
    va_msb_from_hyp_va_bits: bool = False


# linux-image-6.12.117+deb13-arm64 (4K), offsets from its kallsyms (_text ffff800080000000):
# __hyp_idmap_text_start f59000, _end f59d04; __hyp_text_start f59d04, _end f6e000;
# __hyp_rodata_start 1d19000, _end 1d1f000; __hyp_bss_start 23fc000, _end 23fe000;
# kvm_vgic_global_state 16f2278 (sizeof struct vgic_global < 1 page, on one page);
# __kvm_nvhe___per_cpu_start f8b000 .. f8db40. SVE state: sizeof(struct cpu_sve_state) 16 +
# SVE_SIG_REGS_SIZE(16) 8736 for QEMU max's 2048-bit vectors.
# 52-bit VAs with LPA2 (QEMU's max CPU: a 5-level stage-1, the PGD at level -1, as the real
# boot's walk shows), 48 without.
DEBIAN_6_12_4K = KernelImage(
    name="linux-image-6.12.117+deb13-arm64",
    kernel_va_bits=48,
    kernel_va_bits_lpa2=52,
    idmap=(0xF59000, 0xF59D04),
    hyp_sections=((0xF59D04, 0xF6E000), (0x1D19000, 0x1D1F000), (0x23FC000, 0x23FE000)),
    host_sections=((0x16F2278, 0x16F2278 + 1),),
    nvhe_percpu_bytes=0xF8DB40 - 0xF8B000,
    sve_state_bytes=16 + 8736,
    fixmap=True,
    vmemmap_all_memory=True,
    # BTF of the build: struct kvm 3952, kvm_vcpu 7056, pkvm_hyp_vm 4312, pkvm_hyp_vcpu 7072
    kvm_bytes=3952,
    kvm_vcpu_bytes=7056,
    hyp_vm_bytes=4312,
    hyp_vcpu_bytes=7072,
)

# linux-image-6.1.0-50-arm64 (4K): its kallsyms has text symbols only (no KALLSYMS_ALL):
# __hyp_idmap_text_start ce0000 .. ce0ae4, __hyp_text_start ce0ae4 .. cf0000. The data
# sections are read from EL2's stage-1 after a real boot (image at 0x4020_0000): the host's
# __start_rodata d00000 .. __end_rodata 1648000 (shared-owned), __hyp_rodata 1648000 ..
# 164c000, __hyp_bss 1f6e000 .. 1f70000, then __hyp_bss_end .. __bss_stop 200b000
# (shared-owned); the nVHE per-CPU area maps 2 pages.
DEBIAN_6_1_4K = KernelImage(
    name="linux-image-6.1.0-50-arm64",
    kernel_va_bits=48,
    kernel_va_bits_lpa2=48,  # no LPA2 in 6.1
    idmap=(0xCE0000, 0xCE0AE4),
    hyp_sections=((0xCE0AE4, 0xCF0000), (0x1648000, 0x164C000), (0x1F6E000, 0x1F70000)),
    host_sections=((0xD00000, 0x1648000), (0x1F70000, 0x200B000)),
    nvhe_percpu_bytes=2 * 4096,
    # BTF of the build: struct kvm 4040, kvm_vcpu 9680; user_fpsimd_state 528 (one page)
    kvm_bytes=4040,
    kvm_vcpu_bytes=9680,
    shares_task_fpsimd=True,
)

# linux-image-6.12.117+deb13-arm64-16k, from its kallsyms (_text ffffc00080000000) and BTF
# (pkvm_hyp_vm 4328 B with 16K pages). Booted with QEMU's lpa2=off (with LPA2 the 16K
# kernel hangs in protected mode): 47-bit kernel VAs, so hyp_va_bits = IDMAP_VA_BITS = 48
# and the linear map sits in the half chosen by bit 46.
DEBIAN_6_12_16K = KernelImage(
    name="linux-image-6.12.117+deb13-arm64-16k",
    kernel_va_bits=47,
    kernel_va_bits_lpa2=52,
    idmap=(0xF5C000, 0xF5CD04),
    hyp_sections=((0xF5CD04, 0xF74000), (0x1D44000, 0x1D4C000), (0x2484000, 0x2488000)),
    host_sections=((0x171C278, 0x171C278 + 1),),
    nvhe_percpu_bytes=0x201AB40 - 0x2018000,
    sve_state_bytes=16 + 8736,
    fixmap=True,
    vmemmap_all_memory=True,
    kvm_bytes=3952,
    kvm_vcpu_bytes=7056,
    hyp_vm_bytes=4328,
    hyp_vcpu_bytes=7072,
)

# linux-image-6.18.15+deb13-arm64 (4K). Its section offsets are read from EL2's stage-1 after
# a real boot (image at 0x4020_0000, `kernel-check --lifecycle --show-map`): the idmap page and
# hyp text 114d000 .. 1165000 (24 pages, the idmap page first), hyp rodata 217d000 ..
# 2184000, hyp data and bss 29bd000 .. 29bf000; the nVHE per-CPU area and the host SVE
# state map 3 pages each. No host section is mapped at boot: from v6.16 a share with hyp
# (kvm_vgic_global_state's included) maps nothing. BTF: struct kvm 4072, kvm_vcpu 7328,
# pkvm_hyp_vm 4432, pkvm_hyp_vcpu 7344.
DEBIAN_6_18_4K = KernelImage(
    name="linux-image-6.18.15+deb13-arm64",
    kernel_va_bits=48,
    kernel_va_bits_lpa2=52,
    idmap=(0x114D000, 0x114D800),  # within its page: the walk shows the page only
    hyp_sections=((0x114D800, 0x1165000), (0x217D000, 0x2184000), (0x29BD000, 0x29BF000)),
    host_sections=(),
    nvhe_percpu_bytes=3 * 4096,
    sve_state_bytes=16 + 8736,
    fixmap=True,
    vmemmap_all_memory=True,
    kvm_bytes=4072,
    kvm_vcpu_bytes=7328,
    hyp_vm_bytes=4432,
    hyp_vcpu_bytes=7344,
    share_maps_at_el2=False,
    vm_slot_at_create=True,
    guest_stage2_at_el2=True,
)

# linux-image-7.3.4+deb13-arm64 (4K), read the same way (a real boot's EL2 stage-1): hyp text
# 12bf000 .. 12da000 (27 pages, the idmap page first), hyp rodata 26e8000 .. 26f0000, hyp
# data and bss 3140000 .. 3142000 (nvhe/setup.c maps __hyp_data and __hyp_bss, adjacent
# here); per-CPU area 3 pages, host SVE state 4 pages (a larger cpu_sve_state). BTF: struct
# kvm 4136 (kmalloc-8k: two pages), kvm_vcpu 9024, pkvm_hyp_vm 4496, pkvm_hyp_vcpu 9040.
DEBIAN_7_3_4K = KernelImage(
    name="linux-image-7.3.4+deb13-arm64",
    kernel_va_bits=48,
    kernel_va_bits_lpa2=52,
    idmap=(0x12BF000, 0x12BF800),
    hyp_sections=((0x12BF800, 0x12DA000), (0x26E8000, 0x26F0000), (0x3140000, 0x3142000)),
    host_sections=(),
    nvhe_percpu_bytes=3 * 4096,
    sve_state_bytes=4 * 4096,
    fixmap=True,
    vmemmap_all_memory=True,
    kvm_bytes=4136,
    kvm_vcpu_bytes=9024,
    hyp_vm_bytes=4496,
    hyp_vcpu_bytes=9040,
    share_maps_at_el2=False,
    vm_slot_at_create=True,
    guest_stage2_at_el2=True,
    va_msb_from_hyp_va_bits=True,  # the same bit here: 52-bit kernel and hyp VAs with LPA2
)

# linux-image-6.18.15+deb13-arm64-16k, read the same way (booted with QEMU's lpa2=off, as
# the 16K builds need in protected mode): hyp text 114c000 .. 1164000 (the idmap page
# first), hyp rodata 2198000 .. 21a0000, hyp data and bss 2a28000 .. 2a2c000; per-CPU area
# and host SVE state one 16 KiB page each. BTF: pkvm_hyp_vm 4448, the rest as 4K.
DEBIAN_6_18_16K = replace(
    DEBIAN_6_18_4K,
    name="linux-image-6.18.15+deb13-arm64-16k",
    kernel_va_bits=47,
    idmap=(0x114C000, 0x114C800),
    hyp_sections=((0x114C800, 0x1164000), (0x2198000, 0x21A0000), (0x2A28000, 0x2A2C000)),
    nvhe_percpu_bytes=0x2B40,
    hyp_vm_bytes=4448,
)

# linux-image-7.3.4+deb13-arm64-16k, read the same way (lpa2=off): hyp text 12c0000 ..
# 12dc000, hyp rodata 2708000 .. 2710000, hyp data and bss 31b8000 .. 31bc000; per-CPU
# area and host SVE state one page each. The linear alias is in the upper half of the
# 48-bit hyp VA space (0xd966...: bit 47, kvm_hyp_va_bits()), where 6.18's 16K build put it
# in the lower (0x63b2...: bit 46). BTF: pkvm_hyp_vm 4512, the rest as 4K.
DEBIAN_7_3_16K = replace(
    DEBIAN_7_3_4K,
    name="linux-image-7.3.4+deb13-arm64-16k",
    kernel_va_bits=47,
    idmap=(0x12C0000, 0x12C0800),
    hyp_sections=((0x12C0800, 0x12DC000), (0x2708000, 0x2710000), (0x31B8000, 0x31BC000)),
    hyp_vm_bytes=4512,
)

KERNEL_IMAGES: dict[tuple[str, int], KernelImage] = {
    ("v6.1", 4096): DEBIAN_6_1_4K,
    ("v6.12", 4096): DEBIAN_6_12_4K,
    ("v6.12", 16384): DEBIAN_6_12_16K,
    ("v6.18", 4096): DEBIAN_6_18_4K,
    ("v6.18", 16384): DEBIAN_6_18_16K,
    ("v7.3", 4096): DEBIAN_7_3_4K,
    ("v7.3", 16384): DEBIAN_7_3_16K,
}


@dataclass(frozen=True)
class BootMapping:
    """One range EL2 maps at boot: hyp VA page, PA page (None: not block-alignable), pages."""

    what: str
    va_page: int
    nr_pages: int
    pa_page: int | None  # for block alignment (blocks only where `blocks`)
    blocks: bool = False
    after_pool_init: bool = False  # its tables come from the hyp pool (the fixmap)


@dataclass(frozen=True)
class HypVaLayout:
    """Where EL2 puts things in its VA space (in pages of page_shift)."""

    page_shift: int
    va_bits: int  # hyp_va_bits
    kernel_va_bits: int  # vabits_actual
    memstart: int  # memstart_addr: the PA the linear map starts at
    msb_bits: int = 0  # the VA size whose top bit picks the linear alias's half (0: kernel's)

    @property
    def linear_base(self) -> int:
        """kvm_compute_layout: hyp_va_msb (bit vabits_actual - 1), plus a random tag above the
        RAM span; the model's tag is BIT(vabits_actual - 3), which keeps the alias clear of
        the private range and the vmemmap when both halves coincide (16K: 47-bit kernel VAs
        in a 48-bit hyp VA space), as the real boots' tags were."""
        msb = self.msb_bits or self.kernel_va_bits
        return 1 << (msb - 1) | 1 << (self.kernel_va_bits - 3)

    @property
    def private_base(self) -> int:
        return 1 << (self.va_bits - 2)  # __io_map_base, for an idmap below it

    @property
    def vmemmap_base(self) -> int:
        return self.private_base | 1 << (self.va_bits - 3)  # __hyp_vmemmap

    def linear_page(self, pa: int) -> int:
        """The page of the hyp VA of `pa`'s linear alias."""
        return (self.linear_base + pa - self.memstart) >> self.page_shift


def memstart_addr(lowest_ram: int, page_size: int) -> int:
    """arm64_memblock_init: memstart_addr = round_down(start of DRAM, ARM64_MEMSTART_ALIGN)
    (1 GiB with 4K and 16K pages, 512 MiB with 64K)."""
    align = 512 * MIB if page_size == 64 * 1024 else GIB
    return lowest_ram // align * align


def kvm_alloc_pages(page_size: int, nr_cpus: int, image: KernelImage, base: int
                    ) -> dict[str, list[tuple[int, int]]]:
    """PA (start, pages) of init_hyp_mode's per-CPU host allocations, laid out upward from
    `base` in the order the kernel makes them: every CPU's stack page (__get_free_page), then
    every CPU's per-CPU area (alloc_pages(nvhe_percpu_order)), then (6.12, SVE) every CPU's
    host SVE state (alloc_pages(pkvm_host_sve_state_order)); each block naturally aligned."""
    out: dict[str, list[tuple[int, int]]] = {"stack": [], "percpu": [], "sve": []}
    cursor = base
    for what, size in (("stack", page_size), ("percpu", image.nvhe_percpu_bytes),
                       ("sve", image.sve_state_bytes)):
        if not size:
            continue
        block = page_size << _order(ceil_div(size, page_size))
        for _cpu in range(nr_cpus):
            cursor = -(-cursor // block) * block
            out[what].append((cursor, ceil_div(size, page_size)))
            cursor += block
    return out


def _order(nr_pages: int) -> int:
    return max(0, (nr_pages - 1).bit_length())


def boot_mappings(*, page_size: int, nr_cpus: int, image: KernelImage, lpa2: bool,
                  image_base: int,
                  percpu_base: int, memblocks: list[tuple[int, int]],
                  carveout: tuple[int, int], vmemmap_back: int, entry_bytes: int
                  ) -> tuple[HypVaLayout, list[BootMapping]]:
    """recreate_hyp_mappings (and hyp_create_pcpu_fixmap) as a list of mappings, in order.

    memblocks: (base, size) bytes; carveout: (base, size) bytes; vmemmap_back: PA of the
    vmemmap region of the carve-out."""
    shift = page_size.bit_length() - 1
    kernel_bits = image.kernel_va_bits_lpa2 if lpa2 else image.kernel_va_bits
    hyp_bits = max(IDMAP_VA_BITS, kernel_bits)
    lay = HypVaLayout(shift, hyp_bits, kernel_bits,
                      memstart_addr(min(b for b, _ in memblocks), page_size),
                      msb_bits=hyp_bits if image.va_msb_from_hyp_va_bits else 0)
    maps: list[BootMapping] = []

    def linear(what: str, start: int, end: int) -> None:
        first, last = start >> shift, ceil_div(end, page_size)
        maps.append(BootMapping(what, lay.linear_page(first << shift), last - first, None))

    idmap_start = (image_base + image.idmap[0]) >> shift
    idmap_end = ceil_div(image_base + image.idmap[1], page_size)
    maps.append(BootMapping("idmap", idmap_start, idmap_end - idmap_start, idmap_start,
                            blocks=True))
    for va_start, va_end in _vmemmap_ranges(lay, image, memblocks, carveout, entry_bytes):
        maps.append(BootMapping("vmemmap", va_start >> shift, (va_end - va_start) >> shift,
                                vmemmap_back >> shift, blocks=True))
        vmemmap_back += va_end - va_start
    for start, end in image.hyp_sections:
        linear("hyp section", image_base + start, image_base + end)
    linear("carve-out", carveout[0], carveout[0] + carveout[1])
    allocs = kvm_alloc_pages(page_size, nr_cpus, image, percpu_base)
    private = lay.private_base >> shift
    for cpu in range(nr_cpus):
        if allocs["percpu"]:
            pa, _pages = allocs["percpu"][cpu]
            linear("per-CPU area", pa, pa + image.nvhe_percpu_bytes)
        # pkvm_create_stack: a 2-page private range (guard page below), the stack on top.
        private = -(-private // 2) * 2
        maps.append(BootMapping("stack", private + 1, 1, None))
        private += 2
    for pa, _pages in allocs["sve"]:
        linear("host SVE state", pa, pa + image.sve_state_bytes)
    for start, end in image.host_sections:
        linear("host section", image_base + start, image_base + end)
    if image.fixmap:
        for _cpu in range(nr_cpus):
            maps.append(BootMapping("fixmap", private, 1, None, after_pool_init=True))
            private += 1
    return lay, maps


def _vmemmap_ranges(lay: HypVaLayout, image: KernelImage, memblocks: list[tuple[int, int]],
                    carveout: tuple[int, int], entry_bytes: int) -> list[tuple[int, int]]:
    """hyp_back_vmemmap: VA ranges [start, end) of the vmemmap EL2 backs, page aligned."""
    page = 1 << lay.page_shift

    def entry_va(pa: int) -> int:
        return lay.vmemmap_base + (pa >> lay.page_shift) * entry_bytes

    if not image.vmemmap_all_memory:  # v6.1: the carve-out's own slice
        start = entry_va(carveout[0]) // page * page
        end = ceil_div(entry_va(carveout[0]) + (carveout[1] >> lay.page_shift) * entry_bytes,
                       page) * page
        return [(start, end)]
    out: list[tuple[int, int]] = []
    prev_end = 0
    for base, size in sorted(memblocks):
        start = max(entry_va(base) // page * page, prev_end)
        end = ceil_div(entry_va(base + size), page) * page
        if start < end:
            out.append((start, end))
        prev_end = end
    return out




def kernel_image_for(profile: str, page_size: int) -> KernelImage | None:
    """The build whose boot this profile models at this page size, if any."""
    version = profile.split("+")[0]
    return KERNEL_IMAGES.get((version, page_size))


# Where init_hyp_mode's per-CPU allocations sit by default: this far into ZONE_NORMAL (the
# RAM above 4 GiB, where GFP_KERNEL allocations go first), as on the real QEMU boots (6.12:
# 0x1_00aa_4000 with 1 CPU, 0x1_00bb_8000 with 4; 6.1: 0x1_0100_0000). Only which 2 MiB and
# 1 GiB windows they fall in matters (the tables they need).
PERCPU_ZONE_OFFSET = 10 * MIB
ZONE_DMA32_END = 4 * GIB


def default_percpu_base(memblocks: list[tuple[int, int]]) -> int:
    """PERCPU_ZONE_OFFSET into ZONE_NORMAL, or into RAM if there is none above 4 GiB."""
    zone = ZONE_DMA32_END if any(b + n > ZONE_DMA32_END for b, n in memblocks) else min(
        b for b, _ in memblocks)
    return zone + PERCPU_ZONE_OFFSET


def machine_boot(config: SimConfig, carveout_base: int, carveout_bytes: int,
                 vmemmap_back: int) -> tuple[HypVaLayout, list[BootMapping]] | None:
    """boot_mappings for a machine, or None when its profile's boot is not modelled."""
    image = kernel_image_for(config.profile.value, config.page_size)
    if image is None:
        return None
    lowest = min(block.base for block in config.memblocks)
    image_base = (config.kernel_image_base if config.kernel_image_base is not None
                  else lowest + 2 * MIB)
    blocks = [(b.base, b.size) for b in config.memblocks]
    percpu_base = (config.kvm_percpu_base if config.kvm_percpu_base is not None
                   else default_percpu_base(blocks))
    return boot_mappings(
        page_size=config.page_size, nr_cpus=config.nr_cpus, image=image,
        lpa2=config.ia_bits > 48,  # an IPA limit above 48 bits: the CPU has LPA2
        image_base=image_base, percpu_base=percpu_base,
        memblocks=blocks,
        carveout=(carveout_base, carveout_bytes), vmemmap_back=vmemmap_back,
        entry_bytes=config.layout.entry_bytes)


__all__ = ["BootMapping", "HypVaLayout", "KERNEL_IMAGES", "KernelImage", "boot_mappings",
           "kernel_image_for", "kvm_alloc_pages", "machine_boot", "memstart_addr"]
