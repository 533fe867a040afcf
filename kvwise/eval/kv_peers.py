"""Peers of `kvwise eval kv`: the same windows, teacher-forced through other engines' KV caches.

- `quanto` (HF transformers `QuantizedCache`, backend optimum-quanto), KIVI-style (Liu et al.
  2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Sec. 3.2): keys per
  channel (`axis_key=-1`: one scale and zero point per channel and group of 32 tokens), values
  per token (`axis_value=0`: per group of 32 channels of a token), `q_group_size=32` and
  `residual_length=128` (the paper's G and R), int4 or int2. transformers' layer quantizes the
  whole prefill at once (the prefill itself attends to its exact K/V), keeps new tokens in full
  precision until 128 are pending, then re-quantizes everything. Baseline: `hf/fp32`, the same
  HF model with a `DynamicCache`. Bytes are measured: the cache's tensors after the prefill
  (packed codes + fp32 scales and zero points + residual), over 2 x L x K x T x D x 4.
- `llamacpp` (llama-cpp-python on the same GGUF, computing on the file's own quantized weights):
  `type_k` = `type_v` = q8_0 / q4_0 / q4_1 / iq4_nl, flash attention on for every type (llama.cpp
  needs it for a quantized V cache; the f16 baseline uses it too so only the cache type changes).
  Baseline: `llamacpp/f16`. Bytes from the ggml block layouts: q8_0 34 bytes per 32 values, q4_0
  and iq4_nl 18, q4_1 20, f16 2 per value, over 4 per value.

`greedy_agreement` of a peer counts positions where its argmax equals the kvwise fp32-cache
baseline's, like every kvwise setting (so a peer whose own baseline differs from kvwise, e.g.
llama.cpp on Q4_1 weights, starts below 1.0; its own baseline's line shows by how much).
`kept_fraction` is 1.0 for every peer (none evicts). `seconds` excludes loading the model.

Invariants:
- A peer sees exactly the windows' token ids (no re-tokenization, no BOS added).
- Every peer setting starts each window from an empty cache.
- A missing package raises KvwiseError naming it and `make peers` before any model loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kvwise.errors import KvwiseError
from kvwise.eval.kv_eval import KVEvalResult, Window, WindowScores, score_rows, summarize
from kvwise.eval.parity import load_hf_reference

PEER_KINDS = {"quanto": ("int4", "int2"), "llamacpp": ("q8_0", "q4_0", "q4_1", "iq4_nl")}
PEER_BASELINES = {"quanto": "hf/fp32", "llamacpp": "llamacpp/f16"}
# import name -> pip package, per peer
PEER_PACKAGES = {"quanto": {"transformers": "transformers", "optimum.quanto": "optimum-quanto"},
                 "llamacpp": {"llama_cpp": "llama-cpp-python"}}
QUANTO_GROUP_SIZE = 32  # KIVI's G
QUANTO_RESIDUAL = 128  # KIVI's R
# ggml KV types: (bytes per block, values per block)
GGML_BLOCKS = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32),
               "iq4_nl": (18, 32)}


@dataclass(frozen=True)
class PeerSetting:
    peer: str  # "quanto" | "llamacpp"
    kind: str  # "fp32" | "int4" | ... (the peer's baseline kind first)

    @property
    def name(self) -> str:
        return PEER_BASELINES[self.peer] if self.kind in ("fp32", "f16") \
            else f"{self.peer}/{self.kind}"


def parse_peers(spec: str) -> list[PeerSetting]:
    """`quanto,llamacpp:q4_0` -> each peer's baseline, then its kinds (all of them for a bare
    name), in the order given."""
    kinds: dict[str, list[str]] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        peer, _, kind = entry.partition(":")
        if peer not in PEER_KINDS:
            raise KvwiseError(f"peers: unknown peer {peer!r}; known: {sorted(PEER_KINDS)}")
        if kind and kind not in PEER_KINDS[peer]:
            raise KvwiseError(f"peers: {peer} has no cache type {kind!r}; known: "
                              f"{PEER_KINDS[peer]}")
        chosen = kinds.setdefault(peer, [])
        chosen += [k for k in ([kind] if kind else PEER_KINDS[peer]) if k not in chosen]
    base = {"quanto": "fp32", "llamacpp": "f16"}
    return [PeerSetting(p, k) for p, ks in kinds.items() for k in [base[p], *ks]]


def check_available(settings: Sequence[PeerSetting]) -> None:
    for peer in dict.fromkeys(s.peer for s in settings):
        for module, package in PEER_PACKAGES[peer].items():
            if importlib.util.find_spec(module.split(".")[0]) is None or \
                    importlib.util.find_spec(module) is None:
                raise KvwiseError(f"peers: {peer} needs the Python package {package!r}, which "
                                  f"is not installed; run `make peers` (or pip install "
                                  f"{package})")


def measure_peers(settings: Sequence[PeerSetting], model_source: str, windows: Sequence[Window],
                  base_argmax: Sequence[torch.Tensor], threads: int,
                  report: Optional[Callable[[KVEvalResult], None]] = None
                  ) -> list[KVEvalResult]:
    """One result per setting, grouped by peer (each peer's model is loaded once for its
    settings); `report` gets each result as soon as it is measured."""
    check_available(settings)
    out: list[KVEvalResult] = []
    for peer in dict.fromkeys(s.peer for s in settings):
        mine = [s for s in settings if s.peer == peer]
        run = _quanto_runs if peer == "quanto" else _llamacpp_runs
        for result in run(mine, model_source, windows, base_argmax, threads):
            out.append(result)
            if report is not None:
                report(result)
    return out


def _timed(setting: PeerSetting, windows: Sequence[Window], base_argmax: Sequence[torch.Tensor],
           one_window: Callable[[list[int], list[int]], WindowScores]) -> KVEvalResult:
    t0 = time.perf_counter()
    scores = [one_window(ctx, cont) for ctx, cont in windows]
    return summarize(setting.name, scores, base_argmax, time.perf_counter() - t0)


# -- HF transformers: DynamicCache and QuantizedCache (quanto) -------------------------------


def _quanto_runs(settings: Sequence[PeerSetting], model_source: str, windows: Sequence[Window],
                 base_argmax: Sequence[torch.Tensor], threads: int) -> Iterator[KVEvalResult]:
    from transformers import DynamicCache, QuantizedCache

    for ctx, _ in windows:
        # per-channel key groups of 32 tokens must tile the prefill (and every re-quantization
        # after it: context + a multiple of the residual length 128)
        if len(ctx) % QUANTO_GROUP_SIZE:
            raise KvwiseError(f"peers: quanto needs context_len to be a multiple of "
                              f"{QUANTO_GROUP_SIZE}, got {len(ctx)}")
    torch.set_num_threads(threads)
    model = load_hf_reference(model_source)
    cfg = model.config

    def make_cache(kind: str) -> Any:
        if kind == "fp32":
            return DynamicCache(config=cfg)
        return QuantizedCache("quanto", cfg, nbits=int(kind[3:]), axis_key=-1, axis_value=0,
                              q_group_size=QUANTO_GROUP_SIZE, residual_length=QUANTO_RESIDUAL)

    for st in settings:
        yield _timed(st, windows, base_argmax,
                     lambda c, x, k=st.kind: _hf_window(model, make_cache(k), c, x))


@torch.inference_mode()
def _hf_window(model: Any, cache: Any, context: list[int], continuation: list[int]
               ) -> WindowScores:
    # transformers 5.x renamed `past_key_values` to `cache`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([context]), use_cache=True, logits_to_keep=1, **{key: cache})
    held = sum(_tensor_bytes(t) for t in _cache_tensors(cache))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp32 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * len(context) * head_dim * 4
    rows = [out.logits[0, -1:]]  # [1, V]
    for token in continuation[:-1]:
        rows.append(model(torch.tensor([[token]]), use_cache=True, **{key: cache}).logits[0, -1:])
    nll, argmax = score_rows(torch.cat(rows).float(), continuation)
    return WindowScores(nll, argmax, 1.0, held / fp32)


def _cache_tensors(cache: Any) -> list[Any]:
    """The tensors a DynamicCache / QuantizedCache holds: full-precision keys and values (for a
    quantized layer, its residual) and a quantized layer's quantized keys and values."""
    names = ("keys", "values", "_quantized_keys", "_quantized_values")
    found = [getattr(layer, n, None) for layer in cache.layers for n in names]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's storage; a tensor subclass (quanto's QBitsTensor, PackedTensor) is
    the sum over the inner tensors it flattens into (codes, scales, zero points)."""
    if not hasattr(type(t), "__tensor_flatten__"):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, n)) for n in inner)


# -- llama.cpp --------------------------------------------------------------------------------


def _llamacpp_runs(settings: Sequence[PeerSetting], model_source: str,
                   windows: Sequence[Window], base_argmax: Sequence[torch.Tensor], threads: int
                   ) -> Iterator[KVEvalResult]:
    import llama_cpp
    import numpy as np

    if not model_source.endswith(".gguf"):
        raise KvwiseError(f"peers: llamacpp needs a GGUF model, got {model_source!r}")
    n_ctx = max(len(c) + len(x) for c, x in windows)
    for st in settings:
        ggml_type = getattr(llama_cpp, f"GGML_TYPE_{st.kind.upper()}")
        with _no_extra_buffer_types(llama_cpp):
            llm = llama_cpp.Llama(model_path=model_source, n_ctx=n_ctx, type_k=ggml_type,
                                  type_v=ggml_type, flash_attn=True, n_threads=threads,
                                  n_threads_batch=threads, logits_all=False, verbose=False)
        n_vocab = llm.n_vocab()

        def last_logits(llm: Any = llm, n_vocab: int = n_vocab) -> torch.Tensor:
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())[None]

        def window(context: list[int], continuation: list[int], llm: Any = llm,
                   kind: str = st.kind, last_logits: Callable[[], torch.Tensor] = last_logits
                   ) -> WindowScores:
            llm.reset()  # n_tokens = 0: the next eval drops every cached position
            llm.eval(context)
            rows = [last_logits()]  # [1, V]
            for token in continuation[:-1]:
                llm.eval([token])
                rows.append(last_logits())
            nll, argmax = score_rows(torch.cat(rows), continuation)
            block_bytes, block_values = GGML_BLOCKS[kind]
            return WindowScores(nll, argmax, 1.0, block_bytes / block_values / 4)

        try:
            result = _timed(st, windows, base_argmax, window)
        finally:
            llm.close()
        yield result


@contextlib.contextmanager
def _no_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Load with `use_extra_bufts = False` (no weight repacking into ggml's AMX / CPU-repack
    buffer types). llama-cpp-python 0.3.36 does not expose the model parameter, so the default
    parameters its constructor reads are wrapped while it runs. Why: on the project's CPUs
    (AMX-capable, in a VM) its repacked Q4_1 path segfaults in the first decode, taking the
    process down. The weights are then computed from the GGUF's blocks as stored; the KV cache
    path under test is unchanged."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default
