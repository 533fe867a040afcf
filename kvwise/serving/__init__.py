"""OpenAI-compatible HTTP serving over the engine.

- `protocol`: request/response models and the RequestOutput -> JSON builders.
- `openai_api`: the FastAPI app (routes, auth, errors, streaming, disconnect handling).
- `metrics`: Prometheus series under the `kvwise:` prefix.
- `cli`: the `kvwise serve` subcommand.

Nothing outside `serving` imports it (imports flow serving -> engine).
"""
