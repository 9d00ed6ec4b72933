"""The simulated machine's configuration (docs/service.md, Configuration).

`SimConfig` is immutable and validated on construction; the CLI, the server's flags,
config file and environment, and the tests all build one through `SimConfig.from_mapping`
(or the constructor), so there is exactly one place that knows the knobs and defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .layout import (
    GIB,
    LAYOUTS,
    PAGE_SIZES,
    HypPageLayout,
    PageGeometry,
    Profile,
)
from .profiles import (
    MAX_ORDER_FORMULAS,
    KernelProfile,
    VmemmapReservation,
    profile_spec,
    version_key,
)

MAX_IA_BITS = 52  # with LPA2 (4K, 16K) or 64K pages
HYP_MEMBLOCK_REGIONS = 128  # the kernel copies at most this many memblock regions

_SIZE_RE = re.compile(r"^\s*(0x[0-9a-f_]+|[0-9_]+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse '4G', '4GiB', '512M', '0x8000_0000', '65536' into bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size or address: {text!r}")
    number, suffix = m.groups()
    value = int(number.replace("_", ""), 0)
    return value * _SUFFIX[(suffix or "")[:1].lower()]


@dataclass(frozen=True, order=True)
class Memblock:
    """One RAM region [base, base + size) of the host's memblock 'memory' list."""

    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    @classmethod
    def parse(cls, text: str) -> Memblock:
        """Parse 'BASE:SIZE', e.g. '0x80000000:4G'."""
        base, sep, size = text.partition(":")
        if not sep:
            raise ValueError(f"memblock must be BASE:SIZE, not {text!r}")
        return cls(parse_size(base), parse_size(size))

    def __str__(self) -> str:
        return f"[{self.base:#x}, {self.end:#x})"


DEFAULT_MEMBLOCKS = (Memblock(0x8000_0000, 4 * GIB),)


@dataclass(frozen=True)
class SimConfig:
    """All knobs of the simulated machine; defaults are the quick-start configuration."""

    profile: Profile = Profile.V5_14  # a key of profiles.PROFILES
    hyp_page_layout: str | None = None  # '32', '8', '4', '2'; None = the profile's
    page_size: int = PAGE_SIZES["4K"]
    vmemmap_coverage: str = "all"  # 'carveout' (v5.13/v5.14) or 'all' (v6.2)
    max_order_formula: str | None = None  # MAX_ORDER_FORMULAS; None = the profile's
    memblocks: tuple[Memblock, ...] = DEFAULT_MEMBLOCKS
    ia_bits: int = 40
    nr_cpus: int = 8
    # None: what the modelled boot takes (v6.1, v6.12: core/el2_boot.py; older profiles 0)
    hyp_s1_early_used_pages: int | None = None
    hyp_pool_extra_pages: int = 0
    carveout_base: int | None = None  # None = top-down placement (docs/reservation.md)
    faithful_bugs: bool = False  # reproduce the quirks the profile's kernel has (profiles.py)
    # Where the kernel image sits (None: QEMU virt's -kernel placement, RAM base + 2 MiB) and
    # where init_hyp_mode's per-CPU host allocations start (None: el2_boot's default); both
    # only place what EL2 maps at boot (v6.1, v6.12).
    kernel_image_base: int | None = None
    kvm_percpu_base: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", profile_spec(self.profile).profile)
        object.__setattr__(self, "memblocks", tuple(sorted(self.memblocks)))
        self._validate()

    def _validate(self) -> None:
        geometry = PageGeometry(self.page_size)  # raises on a bad page size
        if self.hyp_page_layout is not None and self.hyp_page_layout not in LAYOUTS:
            raise ValueError(f"hyp_page_layout must be one of {', '.join(LAYOUTS)}, "
                             f"not {self.hyp_page_layout}")
        if self.vmemmap_coverage not in ("carveout", "all"):
            raise ValueError("vmemmap_coverage must be 'carveout' or 'all'")
        # (not `in (None, *MAX_ORDER_FORMULAS)`: mypyc 2.4 cannot compile a starred tuple there)
        formula = self.max_order_formula
        if formula is not None and formula not in MAX_ORDER_FORMULAS:
            raise ValueError(
                f"max_order_formula must be one of {', '.join(MAX_ORDER_FORMULAS)}, "
                f"not {self.max_order_formula!r}"
            )
        if (
            self.vmemmap_coverage == "carveout"
            and self.kernel.vmemmap_reservation is VmemmapReservation.ALL_MEMORY
        ):
            raise ValueError(
                f"profile {self.profile} reserves and backs the vmemmap of all memory: "
                "vmemmap_coverage 'carveout' does not exist there"
            )
        if not 32 <= self.ia_bits <= MAX_IA_BITS:
            raise ValueError(f"ia_bits must be in 32..{MAX_IA_BITS}, not {self.ia_bits}")
        if self.ia_bits > 48 and not self.has_52_bit_pa:
            raise ValueError(
                f"ia_bits {self.ia_bits} needs 52-bit physical addresses: 64K pages, or 4K/16K"
                " pages with LPA2 (v6.9+ profiles)")
        if not 1 <= self.nr_cpus <= 4096:
            raise ValueError(f"nr_cpus must be in 1..4096, not {self.nr_cpus}")
        if not self.memblocks:
            raise ValueError("at least one memblock is needed")
        if len(self.memblocks) > HYP_MEMBLOCK_REGIONS:
            raise ValueError(f"at most {HYP_MEMBLOCK_REGIONS} memblocks (HYP_MEMBLOCK_REGIONS)")
        for block in self.memblocks:
            if block.size <= 0 or block.base < 0:
                raise ValueError(f"memblock {block} is empty or negative")
            if block.base % geometry.page_size or block.size % geometry.page_size:
                raise ValueError(f"memblock {block} is not page aligned")
            if block.end > 1 << self.ia_bits:
                raise ValueError(f"memblock {block} lies beyond the {self.ia_bits}-bit IPA space")
        for lower, upper in zip(self.memblocks, self.memblocks[1:], strict=False):
            if upper.base < lower.end:
                raise ValueError(f"memblocks {lower} and {upper} overlap")
        for name in ("hyp_s1_early_used_pages", "hyp_pool_extra_pages", "kernel_image_base",
                     "kvm_percpu_base"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def has_52_bit_pa(self) -> bool:
        """52-bit PA/IPA exist: ARM64_PA_BITS_52 with 64K pages, LPA2 with 4K/16K (v6.9+)."""
        return self.page_size == PAGE_SIZES["64K"] or version_key(self.profile.value) >= (6, 9)

    @property
    def kernel(self) -> KernelProfile:
        """The profile's registry record: what this kernel version decides."""
        return profile_spec(self.profile)

    @property
    def layout(self) -> HypPageLayout:
        return LAYOUTS[self.hyp_page_layout or self.kernel.default_layout]

    @property
    def pool_max_order_formula(self) -> str:
        """hyp_pool_init's max_order formula: the knob if set, else the profile's."""
        return self.max_order_formula or self.kernel.max_order_formula

    @property
    def geometry(self) -> PageGeometry:
        return PageGeometry(self.page_size)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SimConfig:
        """Build from loosely typed values (CLI flags, TOML/YAML, environment strings)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            kwargs[key] = _coerce(key, value)
        return cls(**kwargs)


def _coerce(key: str, value: Any) -> Any:
    if key == "profile":  # a name ("v6.12") becomes the Profile the field's type says
        return profile_spec(value).profile
    if key == "memblocks":
        items = [value] if isinstance(value, str) else list(value)
        return tuple(
            Memblock.parse(v) if isinstance(v, str)
            else Memblock(parse_size(v["base"]), parse_size(v["size"])) if isinstance(v, Mapping)
            else v
            for v in items
        )
    if key == "page_size":
        if isinstance(value, str) and value.upper() in PAGE_SIZES:
            return PAGE_SIZES[value.upper()]
        return parse_size(value)
    if key == "hyp_page_layout":
        return str(value)
    if key in ("carveout_base", "kernel_image_base", "kvm_percpu_base"):
        return parse_size(value)
    if key in ("ia_bits", "nr_cpus", "hyp_s1_early_used_pages", "hyp_pool_extra_pages"):
        return int(value, 0) if isinstance(value, str) else int(value)
    if key == "faithful_bugs":
        return parse_bool(value)
    return value


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_bool(value: Any) -> bool:
    """A boolean from a flag, an environment variable or a config file: a bool as is, 0 or
    1, or one of TRUE_WORDS / FALSE_WORDS (any case, surrounding blanks ignored). Anything
    else is a ValueError: "yes please" is a typo, not False. The one boolean parser of
    every configuration source (pkvm_sim/settings.py exports it to the knobs)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
    raise ValueError(f"must be true or false, not {value!r}")
