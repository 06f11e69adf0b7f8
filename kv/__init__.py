"""KV subsystem: block pool, prefix tree, host tier, batch admission."""

from greenroom.kv.admission import BatchAdmission, PrefixClaim
from greenroom.kv.block_pool import NULL_BLOCK, BlockPool
from greenroom.kv.eviction import EvictionQueue
from greenroom.kv.host_tier import HostTier
from greenroom.kv.manager import KVCacheManager
from greenroom.kv.prefix_cache import PrefixCache
from greenroom.kv.radix_tree import RadixNode, RadixTree, block_hash, extra_key

__all__ = [
    "NULL_BLOCK",
    "BatchAdmission",
    "BlockPool",
    "EvictionQueue",
    "HostTier",
    "KVCacheManager",
    "PrefixCache",
    "PrefixClaim",
    "RadixNode",
    "RadixTree",
    "block_hash",
    "extra_key",
]
