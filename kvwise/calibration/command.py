"""The `kvwise calibrate` command: capture KVQuant activations of a text once, fit every format.

`kvwise calibrate --kv-cache-dtype nuq4,nuq3-1%,int2 --text-file F --output calib.json` loads
the model with fp32 weights, tokenizes F (no special tokens), captures `--num-samples` windows
of `--context-len` tokens (kvwise.calibration.capture) and hands them to
`kvwise.cache.kvquant.calibration.fit_calibration`, which fits one calibration per format; the
result is saved as one JSON file.

Invariants:
- Importing this module and building its parser import no torch (the CLI rule of kvwise.cli):
  `cmd_calibrate` imports the capture, the fitting code and the loader when it runs.
- Bad input (a name that is not a KVQuant format, a missing or unreadable text file, a text
  shorter than one sample, num_samples < 1, context_len < 2 or over the model's positions)
  raises a KvwiseError (one `error:` line, exit 2); every check that needs no model runs before
  the model loads.
- Only the flags that load the model are taken (`LOAD_FLAGS`, declared in ENGINE_FLAGS); the
  weights are always fp32 and the compute dtype float32 (the capture reads dense weights).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

from kvwise.config import ENGINE_FLAGS, EngineConfig
from kvwise.errors import ConfigError, InvalidRequestError
from kvwise.kv_names import KVQuantSpec, parse_format_name

LOAD_FLAGS = ("model", "tokenizer", "device", "threads")  # engine flags the command takes
DEFAULT_NUM_SAMPLES = 16  # KVQuant's calibration set: 16 x 2048 tokens (Hooper et al. 2024, §4)
DEFAULT_CONTEXT_LEN = 2048


def add_calibrate_parser(sub: Any) -> None:
    """Add `calibrate` to the CLI's subparsers (`func=cmd_calibrate`)."""
    p = sub.add_parser("calibrate", help="fit KVQuant KV cache formats on a text (offline)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--kv-cache-dtype", dest="kv_formats", required=True,
                   help="comma list of KVQuant formats to fit, e.g. nuq4,nuq4-1%%,nuq3,"
                        "nuq3-1%%,nuq2,nuq2-1%%,int4,int2")
    p.add_argument("--text-file", required=True, help="UTF-8 calibration text")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                   help=f"windows of the text to run (default {DEFAULT_NUM_SAMPLES})")
    p.add_argument("--context-len", type=int, default=DEFAULT_CONTEXT_LEN,
                   help=f"tokens per window (default {DEFAULT_CONTEXT_LEN})")
    p.add_argument("--seed", type=int, default=0, help="window offsets and the fitting's seed")
    p.add_argument("--output", required=True, help="calibration file to write (JSON)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g = p.add_argument_group("engine")
    for name, typ, help_text in ENGINE_FLAGS:
        if name in LOAD_FLAGS:
            g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                           help=help_text)
    p.set_defaults(func=cmd_calibrate)


def parse_formats(value: str) -> list[KVQuantSpec]:
    """'nuq4,int2' -> [KVQuantSpec, ...] in order; KvwiseError for an empty list, a name that is
    not a KVQuant format, bad parameters or a format given twice."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError("kv_cache_dtype: give at least one KVQuant format, e.g. nuq4",
                          "kv_cache_dtype")
    specs: list[KVQuantSpec] = []
    for name in names:
        try:
            spec = parse_format_name(name)
        except ValueError as e:
            raise ConfigError(str(e), "kv_cache_dtype") from None
        if spec is None:
            raise ConfigError(f"kv_cache_dtype: {name!r} is not a KVQuant format (nuqB or intB, "
                              f"B in 2, 3, 4, optionally -P% outliers, e.g. nuq3-1%)",
                              "kv_cache_dtype")
        if spec in specs:
            raise ConfigError(f"kv_cache_dtype: {spec.name} is given twice", "kv_cache_dtype")
        specs.append(spec)
    return specs


def _read_text(path: str) -> tuple[str, str]:
    """-> (text, sha256 hex of the file's bytes); KvwiseError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidRequestError(f"text_file: cannot read {path!r}: {e.strerror}",
                                  "text_file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"text_file: {path!r} is not UTF-8 ({e})", "text_file") from None
    return text, hashlib.sha256(data).hexdigest()


def _load_config(args: argparse.Namespace) -> EngineConfig:
    kwargs = {name: getattr(args, name) for name in LOAD_FLAGS
              if getattr(args, name, None) is not None}
    return EngineConfig.from_kwargs(weight_dtype="fp32", dtype="float32", **kwargs)


def _check_args(args: argparse.Namespace) -> tuple[list[KVQuantSpec], str, str]:
    """Every check that needs no model -> (specs, text, sha256 of the text file)."""
    specs = parse_formats(args.kv_formats)
    if args.num_samples < 1:
        raise InvalidRequestError(f"num_samples: must be >= 1, got {args.num_samples}",
                                  "num_samples")
    if args.context_len < 2:
        raise InvalidRequestError(f"context_len: must be >= 2, got {args.context_len}",
                                  "context_len")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise InvalidRequestError(f"output: directory {out_dir!r} does not exist", "output")
    text, text_sha256 = _read_text(args.text_file)
    return specs, text, text_sha256


def cmd_calibrate(args: argparse.Namespace) -> int:
    specs, text, text_sha256 = _check_args(args)
    config = _load_config(args)

    import torch

    from kvwise.cache.kvquant.calibration import fit_calibration
    from kvwise.calibration.capture import capture_kv_activations
    from kvwise.engine.model_setup import build_model

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available", "device")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model, tokenizer, mc, _ = build_model(config, torch.float32, device)
    if args.context_len > mc.max_position_embeddings:
        raise InvalidRequestError(f"context_len: {args.context_len} exceeds the model's context "
                                  f"length {mc.max_position_embeddings}", "context_len")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < args.context_len:
        raise InvalidRequestError(f"text_file: {args.text_file!r} has {len(ids)} tokens, fewer "
                                  f"than one sample of context_len={args.context_len}",
                                  "text_file")
    t0 = time.perf_counter()
    layers = capture_kv_activations(model, ids, args.num_samples, args.context_len, args.seed,
                                    progress=args.progress)
    print(f"[captured {args.num_samples} x {args.context_len} tokens of {len(ids)} in "
          f"{time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    # the model as the user named it (portable, unlike its resolved path) and its KV shape
    identity = {"model": config.model, "num_layers": mc.num_layers,
                "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                "rope_theta": mc.rope_theta}
    source_info = {"text_file": os.path.basename(args.text_file), "text_sha256": text_sha256,
                   "num_samples": args.num_samples, "context_len": args.context_len,
                   "seed": args.seed}
    del model  # the fitting reads only the capture: free the weights first
    calibration = fit_calibration(layers, specs, seed=args.seed, model_identity=identity,
                                  source=source_info)
    calibration.save(args.output)
    for spec in specs:
        print(f"calibrated kv_cache_dtype={spec.name} layers={mc.num_layers} "
              f"samples={args.num_samples} context_len={args.context_len}")
    print(f"wrote {args.output}")
    return 0
