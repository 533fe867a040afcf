"""Benchmarks of kvwise against its peers (HF transformers, llama.cpp) on identical token ids.

Modules: `workloads` (model files, prompts), `peers` (one runner per engine), `latency` and
`throughput` (what is measured), `report` (result lines, BENCHMARKS.md, charts), `cli` (flags).
"""
