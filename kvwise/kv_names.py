"""KV format names with parameters: KVQuant's `nuq4`, `nuq3-1%`, `nuq2-0.5%`, `int4`, `int2`.

A name says the datatype (`nuq`: a calibrated per-layer non-uniform lookup table; `int`: a
uniform grid over the same normalized range), the bit width, and an optional dense-and-sparse
outlier fraction (`-1%`: about 1% of each vector's values are kept exactly in fp16). Everything
else about the layout is shared (KVQuant, Hooper et al. 2024, §3): keys per channel before
RoPE, values per token, an fp16 attention sink.

Invariants:
- `parse_format_name(spec.name) == spec` (names round-trip; the canonical form drops trailing
  zeros: `nuq3-1%`, `nuq3-0.5%`).
- Bits are 2, 3 or 4; the outlier fraction is in [0, 10%].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_NAME = re.compile(r"^(nuq|int)([234])(?:-(\d+(?:\.\d+)?)%)?$")
MAX_OUTLIER_PERCENT = 10.0


@dataclass(frozen=True)
class KVQuantSpec:
    kind: str  # "nuq" | "int"
    bits: int  # 2 | 3 | 4
    outlier_percent: float  # 0 = no dense-and-sparse outliers

    @property
    def name(self) -> str:
        base = f"{self.kind}{self.bits}"
        if self.outlier_percent == 0:
            return base
        return f"{base}-{self.outlier_percent:g}%"

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_percent / 100.0

    @property
    def num_levels(self) -> int:
        return 1 << self.bits


def parse_format_name(name: str) -> Optional[KVQuantSpec]:
    """-> the spec of a KVQuant format name, or None when `name` is not one (an `int8` or a dense
    name belongs to other formats). Raises ValueError for a KVQuant name with bad parameters."""
    m = _NAME.match(name)
    if m is None:
        return None
    kind, bits, pct = m.group(1), int(m.group(2)), m.group(3)
    percent = float(pct) if pct is not None else 0.0
    if not 0.0 <= percent <= MAX_OUTLIER_PERCENT:
        raise ValueError(f"kv_cache_dtype: outlier fraction of {name!r} must be within "
                         f"0..{MAX_OUTLIER_PERCENT:g}%")
    return KVQuantSpec(kind, bits, percent)
