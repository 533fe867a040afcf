"""Building an engine's KV store: the format by name, the pool size from the memory budget, and
what a KVQuant format needs (its calibration, RoPE tables, sink size).

Invariants:
- The pool gets `kv_cache_memory` minus the format's reserved side storage (KVQuant: an fp16
  open tail and sink per request for up to max_num_seqs requests, at most 1/16 of the budget),
  in whole blocks; a budget that holds no block is a ConfigError naming kv_cache_memory.
- A KVQuant format without a calibration (no `kv_quant_calibration` and no file shipped for the
  model) or with an unusable one is a ConfigError naming kv_quant_calibration and the file.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from kvwise.cache.kv_store import KVStore, format_class, make_kv_store
from kvwise.cache.kvquant.calibration import Calibration, CalibrationError
from kvwise.config import EngineConfig
from kvwise.errors import ConfigError
from kvwise.model.config import ModelConfig
from kvwise.model.llama import LlamaModel
from kvwise.model.registry import lookup

# KVQuant calibrations shipped in the package (computed by `kvwise calibrate`; BENCHMARKS.md)
SIDE_BUDGET_DIVISOR = 16  # at most this fraction (1/16) of kv_cache_memory is reserved up front
_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "kvquant")


def shipped_calibration(model: str) -> Optional[str]:
    """The calibration file shipped for a registry model, or None."""
    entry = lookup(model)
    if entry is None:
        return None
    path = os.path.join(_DATA_DIR, f"{entry.name}.json")
    return path if os.path.isfile(path) else None


def build_kv_store(config: EngineConfig, mc: ModelConfig, model: LlamaModel, dtype: torch.dtype,
                   device: torch.device) -> tuple[KVStore, int, int]:
    """-> the store, its number of blocks and bytes per block."""
    name = config.resolved_kv_cache_dtype
    try:
        kv_format = format_class(name)
    except ValueError as e:
        raise ConfigError(str(e), "kv_cache_dtype") from None
    bytes_per_block = kv_format.block_bytes(mc, config.block_size)
    options: dict[str, object] = {}
    reserved = 0
    if config.kvquant:
        # side entries (an fp16 open tail and a sink) for max_num_seqs requests, but at most
        # 1/16 of the budget: the pools grow if more requests are open at once
        entry = kv_format.reserved_bytes(mc, config.block_size, 1, config.kv_quant_sink)
        num_entries = max(1, min(config.max_num_seqs,
                                 config.kv_cache_bytes // SIDE_BUDGET_DIVISOR // entry))
        reserved = num_entries * entry
        options = {"calibration": _calibration(config), "sink_tokens": config.kv_quant_sink,
                   "rope": (model.cos, model.sin), "max_num_seqs": num_entries}
    num_blocks = config.num_blocks or (config.kv_cache_bytes - reserved) // bytes_per_block
    if num_blocks < 1:
        raise ConfigError(
            f"kv_cache_memory: {config.kv_cache_memory} holds no block of {bytes_per_block} "
            f"bytes" + (f" beside {reserved} reserved bytes" if reserved else ""),
            "kv_cache_memory")
    try:
        store = make_kv_store(name, mc, num_blocks, config.block_size, dtype, device, **options)
    except CalibrationError as e:
        raise ConfigError(f"kv_quant_calibration: {e}", "kv_quant_calibration") from None
    return store, num_blocks, bytes_per_block


def _calibration(config: EngineConfig) -> Calibration:
    path = config.kv_quant_calibration or shipped_calibration(config.model)
    if path is None:
        raise ConfigError(f"kv_quant_calibration: kv_cache_dtype={config.kv_cache_dtype} needs a "
                          f"calibration for model {config.model!r}; make one with `kvwise "
                          f"calibrate --model {config.model} --kv-cache-dtype "
                          f"{config.kv_cache_dtype} --text-file TEXT --output calib.json`",
                          "kv_quant_calibration")
    try:
        return Calibration.load(path)
    except CalibrationError as e:
        raise ConfigError(f"kv_quant_calibration: {e}", "kv_quant_calibration") from None
