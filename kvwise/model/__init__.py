"""Model side of kvwise: config, weight loading (GGUF, HF directories, hub), tokenizer, the
Llama-family network, RoPE, sampling. Import the submodules directly; this package re-exports
nothing so that `import kvwise.model.config` stays cheap."""
