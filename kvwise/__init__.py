"""kvwise: an LLM inference and serving engine built around the KV cache."""

import os
import sys
import warnings

from kvwise.kernels.cpu.features import apply_isa_cap

# KVWISE_CPU_ISA=avx2|avx512 caps the instruction set of kvwise's dispatch and of the code numba,
# ATen, oneDNN and MKL generate or pick (e.g. to run an AVX2-only CPU's code paths on an AVX-512
# machine). Those libraries read their settings once, at import (numba) or at their first op
# (torch), so the cap goes into the environment before anything else here imports them; it warns
# if numba already compiled or torch already ran with the host's instruction set.
apply_isa_cap()

# PyTorch's OpenMP workers (GNU libgomp) spin ~300k iterations after every parallel op before
# sleeping. kvwise interleaves torch ops with numba kernels on their own (TBB) threads, and on a
# small CPU those spinning workers take the cores: batched decode attention ran 2-4x slower after
# a torch GEMM (64 x (128+128) int4: 27.0 s with the default spin, 22.2-22.7 s with 10000 or
# 1000). A short spin keeps torch's own back-to-back ops fast. libgomp reads this when it loads,
# so it only takes effect if kvwise is imported before torch (warned otherwise); a user's setting
# wins.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
    if "torch" in sys.modules:  # too late: libgomp has read its settings already
        warnings.warn(
            "kvwise was imported after torch, so torch's OpenMP workers keep their default long "
            "spin and slow down kvwise's CPU kernels (64-request throughput ~20% lower). Import "
            "kvwise first, or set GOMP_SPINCOUNT=10000 in the environment.", stacklevel=2)


from kvwise.config import EngineConfig  # noqa: E402
from kvwise.outputs import CompletionOutput, RequestOutput  # noqa: E402
from kvwise.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):  # lazy: `import kvwise` stays cheap for the CLI's --help
    if name == "LLM":
        from kvwise.llm import LLM

        return LLM
    raise AttributeError(name)
