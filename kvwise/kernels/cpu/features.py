"""The CPU feature table every fast path dispatches from, and the `KVWISE_CPU_ISA` cap on it.

The host's features are read once (LLVM's view via llvmlite, else /proc/cpuinfo). The cap
`KVWISE_CPU_ISA=avx2|avx512|native` (default native) lowers them to a named level, so an
AVX-512 machine can run the code an AVX2-only CPU (e.g. AMD Zen 3) runs:
- avx2: AVX2 + FMA + F16C (x86-64-v3); no AVX-512, no VNNI, no native bf16, no AMX.
- avx512: adds AVX-512 F/BW/CD/DQ/VL (Skylake-SP, oneDNN's AVX512_CORE); still no VNNI, no
  bf16, no AMX.
`apply_isa_cap` hands the same cap to numba (target CPU), ATen, oneDNN and MKL through their
environment variables, so the code they generate or pick lacks the dropped instructions too.

Invariants:
- This module is the one place that reads `KVWISE_CPU_ISA` and the CPU's feature flags; other
  modules ask `cpu_features()`.
- A cap only removes features: `cpu_features()` is a subset of `host_cpu_features()`, and a cap
  at or above the host's level changes nothing (no target is forced on a CPU that lacks it).
- `apply_isa_cap` never overrides a variable the user has set (numba's CPU name and features
  count as one setting), and takes full effect only before numba compiles anything and before
  torch runs its first op (kvwise/__init__.py calls it first thing; it warns when too late).
- numba's on-disk cache keys entries by target CPU name and features (codegen magic tuple), so
  a capped run never loads code cached by an uncapped one, or the reverse.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional, cast, get_args

ENV_VAR = "KVWISE_CPU_ISA"
IsaCap = Literal["avx2", "avx512", "native"]
ISA_CAPS: tuple[IsaCap, ...] = get_args(IsaCap)

# field -> (LLVM feature name, /proc/cpuinfo flag); the two spellings differ for some
_NAMES: dict[str, tuple[str, str]] = {
    "avx2": ("avx2", "avx2"),
    "fma": ("fma", "fma"),
    "f16c": ("f16c", "f16c"),
    "avx512f": ("avx512f", "avx512f"),
    "avx512bw": ("avx512bw", "avx512bw"),
    "avx512cd": ("avx512cd", "avx512cd"),
    "avx512dq": ("avx512dq", "avx512dq"),
    "avx512vl": ("avx512vl", "avx512vl"),
    "avx512vnni": ("avx512vnni", "avx512_vnni"),
    "avx512bf16": ("avx512bf16", "avx512_bf16"),
    "avxvnni": ("avxvnni", "avx_vnni"),
    "amx_bf16": ("amx-bf16", "amx_bf16"),
}
_AVX2 = frozenset({"avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_KEPT: dict[IsaCap, frozenset[str]] = {"avx2": _AVX2, "avx512": _AVX512,
                                       "native": frozenset(_NAMES)}


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions kvwise's kernels and dispatch care about."""

    avx2: bool = False
    fma: bool = False
    f16c: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512cd: bool = False
    avx512dq: bool = False
    avx512vl: bool = False
    avx512vnni: bool = False  # vpdpbusd on zmm: simd.vdot_q4q8
    avx512bf16: bool = False  # with amx_bf16: "native bf16" for the large-step GEMM (dispatch)
    avxvnni: bool = False  # VEX-encoded VNNI (Alder Lake, Zen 5): absent on AVX2-only CPUs
    amx_bf16: bool = False

    def capped(self, cap: IsaCap) -> CpuFeatures:
        """These features without those above `cap`."""
        kept = _KEPT[cap]
        return dataclasses.replace(self, **{f: False for f in _NAMES if f not in kept})


@dataclass(frozen=True)
class _Target:
    """What numba, ATen, oneDNN and MKL are told for one cap (their own spellings)."""

    numba_cpu: str  # the level's first LLVM CPU model; set only on hosts above it (isa_level)
    aten: str
    onednn: str
    mkl: str


_TARGETS: dict[IsaCap, _Target] = {
    "avx2": _Target("haswell", "avx2", "AVX2", "AVX2"),
    "avx512": _Target("skylake-avx512", "avx512", "AVX512_CORE", "AVX512"),
}


def parse_isa_cap(value: Optional[str]) -> IsaCap:
    """The cap named by a `KVWISE_CPU_ISA` value; unset or empty means native."""
    name = (value or "").strip().lower() or "native"
    if name not in ISA_CAPS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a CPU ISA cap: use one of "
                         f"{', '.join(ISA_CAPS)} (default native)")
    return cast(IsaCap, name)


def _read_host() -> dict[str, bool]:
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return {f: bool(feats.get(name)) for f, (name, _) in _NAMES.items()}
    except Exception:  # llvmlite raises RuntimeError where LLVM cannot query the host
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {f: flag in flags for f, (_, flag) in _NAMES.items()}


@functools.cache
def host_cpu_features() -> CpuFeatures:
    """The host CPU's features, uncapped (read once)."""
    return CpuFeatures(**_read_host())


@functools.cache
def isa_cap() -> IsaCap:
    """The cap `KVWISE_CPU_ISA` asks for (read once; raises ValueError on a bad value)."""
    return parse_isa_cap(os.environ.get(ENV_VAR))


@functools.cache
def cpu_features() -> CpuFeatures:
    """The features fast paths may use: the host's, capped by `KVWISE_CPU_ISA`."""
    return host_cpu_features().capped(isa_cap())


def isa_level() -> IsaCap:
    """The level code is generated for: the cap, or "native" when the cap removes nothing
    from this host (e.g. avx2 on an AVX2-only CPU, or any cap on a non-x86 CPU)."""
    cap = isa_cap()
    return "native" if cpu_features() == host_cpu_features() else cap


def isa_env(level: IsaCap, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that hold numba, ATen, oneDNN and MKL to `level`, less those
    `environ` already sets (a user's choice wins; numba's CPU name and features are one)."""
    if level == "native":
        return {}
    t = _TARGETS[level]
    # an explicit empty feature list: numba pairs a named CPU without NUMBA_CPU_FEATURES with
    # the *host's* feature string, which would switch AVX-512 back on
    env = {"ATEN_CPU_CAPABILITY": t.aten, "ONEDNN_MAX_CPU_ISA": t.onednn,
           "MKL_ENABLE_INSTRUCTIONS": t.mkl}
    if "NUMBA_CPU_NAME" not in environ and "NUMBA_CPU_FEATURES" not in environ:
        env.update(NUMBA_CPU_NAME=t.numba_cpu, NUMBA_CPU_FEATURES="")
    return {k: v for k, v in env.items() if k not in environ}


def apply_isa_cap() -> dict[str, str]:
    """Export the cap (`isa_env`) into this process's environment; -> the variables set.
    Must run before numba compiles and before torch runs an op: both read them once."""
    env = isa_env(isa_level(), os.environ)
    os.environ.update(env)
    if env:
        _warn_if_too_late(env)
    return env


def _warn_if_too_late(env: dict[str, str]) -> None:
    late = []
    config = sys.modules.get("numba.core.config")
    if config is not None and "NUMBA_CPU_NAME" in env:
        config.reload_config()  # numba read its settings at import: let it see the cap now
        registry = sys.modules.get("numba.core.registry")
        # the target machine is built with the CPU target context, on the first @njit
        if registry is not None and "_toplevel_target_context" in vars(registry.cpu_target):
            late.append("numba (its target machine is built for the host CPU)")
    torch = sys.modules.get("torch")
    backends = getattr(torch, "backends", None)
    if "ATEN_CPU_CAPABILITY" in env and backends is not None and hasattr(backends, "cpu"):
        # ATen fixes its capability at its first op; asking now fixes it to the cap if not yet
        if backends.cpu.get_cpu_capability().lower() != env["ATEN_CPU_CAPABILITY"]:
            late.append("torch (it already ran ops with its host kernels)")
    if late:
        warnings.warn(f"{ENV_VAR}={isa_cap()} was applied after "
                      f"{' and '.join(late)}; code from them may still use instructions above "
                      "the cap. Import kvwise first.", stacklevel=4)


__all__ = ["ENV_VAR", "ISA_CAPS", "CpuFeatures", "IsaCap", "apply_isa_cap", "cpu_features",
           "host_cpu_features", "isa_cap", "isa_env", "isa_level", "parse_isa_cap"]
