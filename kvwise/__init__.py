"""kvwise: an LLM inference and serving engine built around the KV cache."""

from kvwise.config import EngineConfig
from kvwise.outputs import CompletionOutput, RequestOutput
from kvwise.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):  # lazy: `import kvwise` stays cheap for the CLI's --help
    if name == "LLM":
        from kvwise.llm import LLM

        return LLM
    raise AttributeError(name)
