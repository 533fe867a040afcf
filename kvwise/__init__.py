"""kvwise: an LLM inference and serving engine built around the KV cache."""

import os

# PyTorch's OpenMP workers (GNU libgomp) spin ~300k iterations after every parallel op before
# sleeping. kvwise interleaves torch ops with numba kernels on their own (TBB) threads, and on a
# small CPU those spinning workers take the cores: batched decode attention ran 2-4x slower after
# a torch GEMM. A short spin keeps torch's own back-to-back ops fast. libgomp reads this when it
# loads, so it only takes effect if kvwise is imported before torch; a user's setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


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
