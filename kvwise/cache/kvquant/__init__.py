"""KVQuant (Hooper et al. 2024): the quantizer and its calibration. The KV format built on them
is kvwise.cache.kvquant_kv; format names are parsed by kvwise.kv_names."""
