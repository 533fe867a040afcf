"""A one-layer KV store holding given rows, so backend tests read through a real format."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvwise.cache.kv_store import KVStore, LayerKV, make_kv_store


def layer_kv(k_rows: torch.Tensor, v_rows: torch.Tensor, block_size: int,
             fmt: str = "float32") -> LayerKV:
    """k_rows, v_rows [N*S, K, D] fp32 -> layer 0 of a `fmt` store of N blocks holding them
    (rounded / quantized by the format, as the engine's writes would be)."""
    rows, kh, d = k_rows.shape
    shape = SimpleNamespace(num_layers=1, num_kv_heads=kh, head_dim=d)
    store: KVStore = make_kv_store(fmt, shape, rows // block_size, block_size, torch.float32,
                                   torch.device("cpu"))
    store.write(0, torch.arange(rows), k_rows.float(), v_rows.float())
    return store.layer(0)
