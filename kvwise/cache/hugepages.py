"""Large zeroed CPU tensors backed by transparent huge pages where the kernel offers them.

Why: the decode attention kernel walks the KV pool block by block, and the pool is hundreds of
MB. With 4 KiB pages every block is a fresh TLB miss and the hardware prefetchers stop at each
page boundary; 2 MiB pages remove both. Linux's default THP mode is `madvise`, so the memory has
to ask for them: an anonymous mmap with MADV_HUGEPAGE (zero-filled by the kernel, no copy).

Invariants:
- The returned tensor owns its mapping (torch keeps the buffer's owner alive); it is zeroed.
- Anywhere the mapping or the advice is unavailable (not Linux, not CPU, small sizes), the result
  is an ordinary `torch.zeros` tensor: huge pages change speed, never values.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 16 * HUGE_PAGE  # below this the TLB is not the problem


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or advise is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    size = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(advise)
    except (OSError, ValueError):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
