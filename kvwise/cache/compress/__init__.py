"""KV compression policies, chosen by name (`--kv-compression`): which tokens of a request's KV
groups to evict after a step. Pure bookkeeping: a policy names slots, the KV manager evicts and
compacts them, the store copies the kept rows (kvwise.cache.kv_store.KVStore.copy_rows)."""

from kvwise.cache.compress.policy import (
    KV_COMPRESSIONS,
    CompressionPolicy,
    StreamingPolicy,
    make_policy,
)

__all__ = ["KV_COMPRESSIONS", "CompressionPolicy", "StreamingPolicy", "make_policy"]
