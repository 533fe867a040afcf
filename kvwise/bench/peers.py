"""Runners: one adapter per engine (kvwise and its peers) behind one timing interface.

A runner owns one loaded engine and answers three timing questions on token-id prompts; the
benchmarks turn the answers into rates. Runners are chosen by name from `RUNNERS`.

Invariants:
- Every runner decodes greedily and ignores EOS, and checks that it produced exactly the number of
  tokens asked for (`BenchError` otherwise), so all engines do the same amount of work.
- Every call starts from an empty context (no KV reuse between calls), except where an engine's
  own prefix cache does it: the workloads hand out distinct prompts so that never happens.
- Times are wall-clock seconds from `time.perf_counter` (or the engine's own `time.monotonic`
  request metrics for kvwise).
- The CPU thread count is the same for every runner: torch threads for kvwise and HF,
  `n_threads` / `n_threads_batch` for llama.cpp.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional

from kvwise.bench.workloads import ModelFiles
from kvwise.errors import KvwiseError


class BenchError(KvwiseError, RuntimeError):
    """An engine under benchmark did not do the work it was asked for."""


class PeerUnavailable(KvwiseError, RuntimeError):
    """A peer engine cannot run here (package missing, model format unsupported)."""


def _check_count(engine: str, got: int, want: int) -> None:
    if got != want:
        raise BenchError(f"{engine} generated {got} tokens, expected {want}")


class Runner(ABC):
    name: str
    # Said next to throughput results when the engine cannot batch (e.g. "sequential").
    throughput_note: Optional[str] = None

    @abstractmethod
    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        """Time to first token of one request with this prompt."""

    @abstractmethod
    def decode_seconds(self, prompt_ids: list[int], num_tokens: int) -> float:
        """Generate `num_tokens`; seconds from the first to the last (num_tokens - 1 steps)."""

    @abstractmethod
    def batch_seconds(self, prompts: list[list[int]], num_tokens: int) -> float:
        """Wall time to generate `num_tokens` for every prompt, all submitted at once."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory."""


class KvwiseRunner(Runner):
    name = "kvwise"

    def __init__(self, engine_kwargs: dict[str, Any], files: ModelFiles, threads: int,
                 max_context: int) -> None:
        from kvwise import LLM

        self._llm = LLM(**engine_kwargs)

    def _generate(self, prompts: list[list[int]], num_tokens: int) -> list[Any]:
        from kvwise import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
        outs = self._llm.generate(prompts, params, use_tqdm=False)
        for out in outs:
            _check_count(self.name, len(out.outputs[0].token_ids), num_tokens)
        return outs

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        (out,) = self._generate([prompt_ids], 1)
        return out.metrics.first_token_time - out.metrics.arrival_time

    def decode_seconds(self, prompt_ids: list[int], num_tokens: int) -> float:
        (out,) = self._generate([prompt_ids], num_tokens)
        m = out.metrics
        last = m.last_token_time if m.last_token_time is not None else m.finished_time
        return last - m.first_token_time

    def batch_seconds(self, prompts: list[list[int]], num_tokens: int) -> float:
        start = time.perf_counter()
        self._generate(prompts, num_tokens)
        return time.perf_counter() - start

    def close(self) -> None:
        del self._llm


class HfRunner(Runner):
    """HF transformers eager PyTorch; a GGUF is dequantized to fp32 at load time."""

    name = "hf"

    def __init__(self, engine_kwargs: dict[str, Any], files: ModelFiles, threads: int,
                 max_context: int) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise PeerUnavailable(f"transformers is not installed ({e})") from e
        torch.set_num_threads(threads)
        kwargs = {} if files.gguf_file is None else {"gguf_file": files.gguf_file}
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(
            files.directory, dtype=torch.float32, **kwargs
        ).eval()
        eos = self._model.generation_config.eos_token_id
        self._pad_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    def _generate(self, prompts: list[list[int]], num_tokens: int, streamer: Any = None) -> Any:
        torch = self._torch
        input_ids = torch.tensor(prompts, dtype=torch.long)  # [B, T]; equal lengths, no padding
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,  # HF's way to ignore EOS
                do_sample=False,
                pad_token_id=self._pad_id,
                streamer=streamer,
            )
        _check_count(self.name, out.shape[1] - input_ids.shape[1], num_tokens)
        return out

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        torch = self._torch
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)  # [1, T]
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(dim=-1)
        return time.perf_counter() - start

    def decode_seconds(self, prompt_ids: list[int], num_tokens: int) -> float:
        times: list[float] = []
        self._generate([prompt_ids], num_tokens, streamer=_TokenClock(times))
        _check_count(self.name, len(times), num_tokens)
        return times[-1] - times[0]

    def batch_seconds(self, prompts: list[list[int]], num_tokens: int) -> float:
        start = time.perf_counter()
        self._generate(prompts, num_tokens)
        return time.perf_counter() - start

    def close(self) -> None:
        del self._model


class _TokenClock:
    """HF streamer that records when each generated token arrives (the first put is the prompt)."""

    def __init__(self, times: list[float]) -> None:
        self._times = times
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._times.append(time.perf_counter())

    def end(self) -> None:
        pass


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python, computing on the GGUF's own quantized weights."""

    name = "llamacpp"
    throughput_note = "sequential"  # the Python API has no batched generate

    def __init__(self, engine_kwargs: dict[str, Any], files: ModelFiles, threads: int,
                 max_context: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise PeerUnavailable(f"llama-cpp-python is not installed ({e})") from e
        if files.gguf_path is None:
            raise PeerUnavailable(f"model {files.name!r} is not a GGUF file")
        n_batch = engine_kwargs.get("max_num_batched_tokens", 1024)
        self._llm = Llama(
            model_path=files.gguf_path, n_threads=threads, n_threads_batch=threads,
            n_ctx=max_context, n_batch=n_batch, logits_all=False, verbose=False,
        )

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        self._llm.reset()
        start = time.perf_counter()
        self._llm.eval(prompt_ids)
        return time.perf_counter() - start

    def _token_times(self, prompt_ids: list[int], num_tokens: int) -> list[float]:
        self._llm.reset()  # n_tokens = 0: generate() then skips its prefix-reuse search
        times: list[float] = []
        tokens = self._llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0)
        for _ in tokens:  # greedy; generate() never stops on EOS by itself
            times.append(time.perf_counter())
            if len(times) == num_tokens:
                break
        tokens.close()
        _check_count(self.name, len(times), num_tokens)
        return times

    def decode_seconds(self, prompt_ids: list[int], num_tokens: int) -> float:
        times = self._token_times(prompt_ids, num_tokens)
        return times[-1] - times[0]

    def batch_seconds(self, prompts: list[list[int]], num_tokens: int) -> float:
        start = time.perf_counter()
        for prompt_ids in prompts:
            self._token_times(prompt_ids, num_tokens)
        return time.perf_counter() - start

    def close(self) -> None:
        self._llm.close()
        del self._llm


RunnerFactory = Callable[[dict[str, Any], ModelFiles, int, int], Runner]
RUNNERS: dict[str, RunnerFactory] = {
    "kvwise": KvwiseRunner,
    "hf": HfRunner,
    "llamacpp": LlamaCppRunner,
}
PEER_NAMES = ("hf", "llamacpp")
