"""The CPU feature table and the KVWISE_CPU_ISA cap (kvwise/kernels/cpu/features.py).

Claims: the cap parses (each value, a bad one names the variable and the allowed values); a
capped feature set is a subset of the host's and drops exactly what lies above the level; the
exported settings never override a user's; and with KVWISE_CPU_ISA=avx2 `import kvwise` turns
off VNNI and native bf16, points numba at the capped target CPU (the key of its on-disk cache)
and torch at AVX2 kernels, so no compiled code holds an AVX-512 instruction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit
from numba.core import registry

from kvwise.kernels.cpu import features, simd
from kvwise.kernels.cpu.features import CpuFeatures, cpu_features, host_cpu_features

ALL_ON = CpuFeatures(**{f.name: True for f in dataclasses.fields(CpuFeatures)})
ZEN3 = CpuFeatures(avx2=True, fma=True, f16c=True)  # AVX2-only, as AMD Zen 3
CAP_VARS = set(features.isa_env("avx2", {}))


def _on(feats: CpuFeatures) -> set[str]:
    return {k for k, v in dataclasses.asdict(feats).items() if v}


@pytest.mark.parametrize("value, cap", [(None, "native"), ("", "native"), ("native", "native"),
                                        ("avx2", "avx2"), ("AVX512", "avx512"),
                                        (" avx2 ", "avx2"), (" ", "native")])
def test_parse_cap(value, cap):
    assert features.parse_isa_cap(value) == cap


@pytest.mark.parametrize("value", ["avx", "sse4", "avx-512", "znver3"])
def test_bad_cap_names_the_variable_and_the_choices(value):
    with pytest.raises(ValueError) as e:
        features.parse_isa_cap(value)
    msg = str(e.value)
    print(msg)
    assert "KVWISE_CPU_ISA" in msg and repr(value) in msg
    assert all(cap in msg for cap in ("avx2", "avx512", "native"))


def test_capped_features_are_a_subset_of_the_hosts():
    host = host_cpu_features()
    print(f"host: {sorted(_on(host))}; cap {features.isa_cap()}: {sorted(_on(cpu_features()))}")
    assert _on(cpu_features()) <= _on(host)
    for cap in features.ISA_CAPS:
        assert _on(host.capped(cap)) <= _on(host)
        assert host.capped(cap).capped(cap) == host.capped(cap)
    assert host.capped("native") == host


def test_each_cap_drops_what_lies_above_its_level():
    assert _on(ALL_ON.capped("avx2")) == {"avx2", "fma", "f16c"}
    assert _on(ALL_ON.capped("avx512")) == {"avx2", "fma", "f16c", "avx512f", "avx512bw",
                                            "avx512cd", "avx512dq", "avx512vl"}
    # a cap at or above the host's level changes nothing: no target is forced on a CPU lacking it
    assert ZEN3.capped("avx2") == ZEN3 and ZEN3.capped("avx512") == ZEN3


def test_exported_settings_never_override_the_users():
    assert features.isa_env("native", {}) == {}
    env = features.isa_env("avx2", {})
    assert env == {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "",
                   "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert features.isa_env("avx512", {})["NUMBA_CPU_NAME"] == "skylake-avx512"
    # numba's CPU name and features are one setting: a user's name keeps the host features
    user = {"NUMBA_CPU_NAME": "znver3", "ATEN_CPU_CAPABILITY": "default"}
    assert set(features.isa_env("avx2", user)) == {"ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}


def _asm(dispatcher) -> str:
    return next(iter(dispatcher.inspect_asm().values()))


def test_compiled_code_stays_within_the_capped_features():
    """In this process (capped by `make test`'s second run): numba targets the capped CPU and
    neither a 16-lane FMA nor the integer dot product uses an instruction the cap removed."""
    @njit(cache=False)
    def fma(a, out):
        simd.vstore(out, 0, simd.vfma(simd.vload(a, 0), simd.vload(a, 0), simd.vload(a, 0)))

    @njit(cache=False)
    def dot(q, xq, out):
        simd.vstore(out, 0, simd.vdot_q4q8(q, 0, xq, 0))

    out = np.empty(16, np.float32)
    fma(np.ones(16, np.float32), out)
    dot(np.zeros(32, np.uint8), np.zeros(64, np.int8), out)
    feats = cpu_features()
    assert simd.VNNI == feats.avx512vnni
    if not feats.avx512f:
        assert "zmm" not in _asm(fma)
    if not feats.avx512vnni:
        assert "vpdpbusd" not in _asm(dot)
    level = features.isa_level()
    exported = features.isa_env(level, {})
    if exported and all(os.environ.get(k) == v for k, v in exported.items()):  # not the user's
        numba_target = registry.cpu_target.target_context.codegen().magic_tuple()[1:]
        aten = torch.backends.cpu.get_cpu_capability()
        print(f"cap {level}: numba targets {numba_target}, ATen {aten}")
        assert numba_target == (exported["NUMBA_CPU_NAME"], "") and aten.lower() == level


_PROBE = """
import json, {first}, {second}
import numpy as np
from numba import njit
from numba.core import registry
from kvwise.kernels.cpu import simd
from kvwise.model.quant import dispatch

@njit(cache=False)
def fma(a, out):
    simd.vstore(out, 0, simd.vfma(simd.vload(a, 0), simd.vload(a, 0), simd.vload(a, 0)))

out = np.empty(16, np.float32)
fma(np.ones(16, np.float32), out)
print(json.dumps({{
    "vnni": simd.VNNI, "bf16": dispatch.BF16_NATIVE,
    "numba": list(registry.cpu_target.target_context.codegen().magic_tuple()[1:]),
    "aten": torch.backends.cpu.get_cpu_capability(),
    "zmm": "zmm" in next(iter(fma.inspect_asm().values())),
}}))
"""


@pytest.mark.parametrize("first, second", [("kvwise", "torch"), ("torch", "kvwise")])
def test_avx2_cap_reaches_kvwise_numba_and_torch(first, second):
    """A fresh interpreter with only KVWISE_CPU_ISA=avx2 set (torch imported before or after
    kvwise: torch reads its setting at its first op, not at import)."""
    env = {k: v for k, v in os.environ.items() if k not in CAP_VARS}
    env["KVWISE_CPU_ISA"] = "avx2"
    run = subprocess.run([sys.executable, "-c", _PROBE.format(first=first, second=second)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "was applied after" not in run.stderr, run.stderr  # the too-late warning
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(got)
    assert got["vnni"] is False and got["bf16"] is False and got["zmm"] is False
    if host_cpu_features().capped("avx2") != host_cpu_features():  # the host is above AVX2
        assert got["numba"] == ["haswell", ""]
        assert got["aten"] == "AVX2"
