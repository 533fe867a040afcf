"""KV-cache bookkeeping (block pool, prefix tree, KV manager) and storage.

Only the pure-Python bookkeeping is re-exported here, so importing the package pulls in no
tensor library.
"""

from kvwise.cache.block_pool import BlockPool
from kvwise.cache.kv_manager import KVManager
from kvwise.cache.prefix_tree import ChunkNode, PrefixTree, chunk_hash, root_hash

__all__ = ["BlockPool", "ChunkNode", "KVManager", "PrefixTree", "chunk_hash", "root_hash"]
