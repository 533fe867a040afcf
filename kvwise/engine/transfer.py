"""A request as plain data, to leave one engine and continue in another (export / import).

DistServe (Zhong et al. 2024, arXiv:2401.09670) runs a request's prefill on one instance and its
decode on another; this module is what travels between them. `LLMEngine.export_request` builds a
`RequestExport` (`snapshot_request` + the bytes of the request's KV blocks) and
`LLMEngine.import_request` checks it (`validate`, `check_compatible`, `check_block_tensors`) and
rebuilds the request (`restore_request`) before it touches any state.

Wire format of `to_bytes` / `from_bytes` (never pickle: bytes from elsewhere are data only):
    MAGIC (8 bytes) | header length (8 bytes, little-endian) | header (UTF-8 JSON) | safetensors
The JSON header holds every field of `RequestExport` except the tensors; the safetensors part
holds the KV block tensors as "kv.<name>" and the seeded generator's state as "generator_state".

Invariants:
- A `RequestExport` is plain data (ints, floats, strings, lists, dicts, CPU tensors); nothing in
  it refers to the engine that made it.
- `from_bytes` returns an export that passed `validate`, or raises `TransferError`.
- Every check raises `TransferError` whose `field` names what differs, so an importing engine
  that runs them first is unchanged by a refused import.
- A request is restored with the exact counters, sampler state (the seeded generator's state) and
  detokenizer state it had, so it continues with the tokens it would have produced at home.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvwise.config import EngineConfig
from kvwise.errors import InvalidRequestError, TransferError
from kvwise.model.detokenizer import Decoder, IncrementalDetokenizer
from kvwise.model.sampler import make_generator
from kvwise.outputs import Logprob, RequestMetrics
from kvwise.request import Request
from kvwise.sampling_params import SamplingParams

TRANSFER_VERSION = 1
MAGIC = b"KVWXREQ\n"
_LEN = struct.Struct("<Q")
_KV_PREFIX = "kv."
_GENERATOR = "generator_state"
_TENSOR_FIELDS = ("kv_blocks", "generator_state")


@dataclass
class RequestExport:
    """One sequence (a request with n == 1) as it stood between two steps."""

    request_id: str
    prompt: Optional[str]  # the prompt text, when it was given as text
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is in `kv_blocks`
    max_tokens: int  # resolved by the exporting engine
    params: dict[str, Any]  # SamplingParams' constructor fields
    cache_salt: Optional[str]
    cumulative_logprob: Optional[float]
    # per output token: [[token_id, logprob, rank, decoded_token], ...]; None without logprobs
    logprobs: Optional[list[list[list[Any]]]]
    detokenizer: dict[str, Any]  # IncrementalDetokenizer state: prefix_offset, read_offset, text
    generator_state: Optional[torch.Tensor]  # uint8 [G] of the seeded generator; None unseeded
    kv_format: str  # the KV format name (what --kv-cache-dtype resolved to)
    block_size: int
    model: dict[str, Any]  # what identifies the model (see `model_identity`)
    model_fingerprint: str  # sha256 of `model`
    # The format's tensors of the blocks covering num_computed_tokens, in table order.
    kv_blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = TRANSFER_VERSION

    @property
    def num_blocks(self) -> int:
        return -(-self.num_computed_tokens // self.block_size)


# -- model identity -------------------------------------------------------------------------------

def model_identity(source: str, model_config: Any, config: EngineConfig,
                   formats: Any) -> dict[str, Any]:
    """What must agree for KV computed by one engine to be continued by another: the weights'
    file (name and size, not its path, so two machines with the same file agree), the
    architecture and every setting that changes the numbers (dtype, the weight formats as
    resolved, `formats` = the model's `weight_formats`: `auto` on a Q4_1 GGUF is int4 on both
    sides; activation quantization; batch-invariant mode)."""
    path = os.path.normpath(source)
    identity = {
        "source": os.path.basename(path),
        "source_bytes": os.path.getsize(path) if os.path.isfile(path) else None,
        "config": dataclasses.asdict(model_config),
        "dtype": config.dtype,
        "weight_dtype": formats.projections,
        "lm_head_dtype": formats.lm_head,
        "activation_quant": config.activation_quant,
        "batch_invariant": config.batch_invariant,
    }
    return json.loads(json.dumps(identity, sort_keys=True))  # tuples -> lists, as on the wire


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# -- request <-> export -----------------------------------------------------------------------

def snapshot_request(req: Request, prompt: Optional[str], *, kv_format: str, block_size: int,
                     model: dict[str, Any], kv_blocks: dict[str, torch.Tensor]) -> RequestExport:
    """The plain-data state of `req` (the engine adds the KV bytes it read for it)."""
    detok = req.detokenizer
    logprobs = None
    if req.logprobs is not None:
        logprobs = [[[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in d.items()]
                    for d in req.logprobs]
    seeded = req.params.seed is not None and req.generator is not None
    return RequestExport(
        request_id=req.request_id, prompt=prompt,
        prompt_token_ids=list(req.prompt_token_ids),
        output_token_ids=list(req.output_token_ids),
        num_computed_tokens=req.num_computed_tokens, max_tokens=req.max_tokens,
        params={f.name: getattr(req.params, f.name)
                for f in dataclasses.fields(SamplingParams) if f.init},
        cache_salt=req.cache_salt, cumulative_logprob=req.cumulative_logprob,
        logprobs=logprobs,
        detokenizer={"prefix_offset": detok.prefix_offset, "read_offset": detok.read_offset,
                     "text": detok.text},
        generator_state=req.generator.get_state() if seeded else None,
        kv_format=kv_format, block_size=block_size, model=model,
        model_fingerprint=fingerprint(model), kv_blocks=kv_blocks)


def restore_request(export: RequestExport, tokenizer: Decoder, device: torch.device,
                    unseeded_generator: torch.Generator, metrics: RequestMetrics) -> Request:
    """A fresh `Request` (status WAITING, no blocks) in exactly the exported state; an unseeded
    one draws from `unseeded_generator` (the importing engine's). Touches no engine: raises
    TransferError when the state cannot be restored (params, generator, detokenizer)."""
    try:
        params = SamplingParams(**export.params)
    except (InvalidRequestError, TypeError) as e:
        raise TransferError(f"params: {e}", "params") from None
    if params.n != 1:
        raise TransferError(f"params: n must be 1 in an export, got {params.n}", "params")
    generator = make_generator(params.seed, 0, device)
    if generator is None:
        generator = unseeded_generator
    elif export.generator_state is None:
        raise TransferError("generator_state: missing for a seeded request", "generator_state")
    else:
        try:
            generator.set_state(export.generator_state)
        except (RuntimeError, TypeError) as e:
            raise TransferError(f"generator_state: not a {device.type} generator's state ({e})",
                                "generator_state") from None
    req = Request(export.request_id, export.request_id, 0, list(export.prompt_token_ids),
                  params, metrics, export.max_tokens,
                  generator=generator, cache_salt=export.cache_salt)
    # Replaying the outputs rebuilds the detokenizer (a pure function of ids and tokenizer);
    # comparing with the exported state catches a tokenizer that differs.
    detok = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, params.skip_special_tokens)
    for t in export.output_token_ids:
        detok.append(t)
        req.append_token(t)
    got = {"prefix_offset": detok.prefix_offset, "read_offset": detok.read_offset,
           "text": detok.text}
    if got != export.detokenizer:
        raise TransferError(f"detokenizer: state {export.detokenizer!r} differs from this "
                            f"engine's replay {got!r} (a different tokenizer?)", "detokenizer")
    req.detokenizer, req.text = detok, detok.text
    req.num_computed_tokens = export.num_computed_tokens
    req.cumulative_logprob = export.cumulative_logprob
    if export.logprobs is not None:
        try:
            req.logprobs = [{int(t): Logprob(float(lp), int(rank), dec)
                             for t, lp, rank, dec in d} for d in export.logprobs]
        except (TypeError, ValueError) as e:
            raise TransferError(f"logprobs: malformed ({e})", "logprobs") from None
    return req


# -- checks ----------------------------------------------------------------------------------

def validate(export: RequestExport) -> None:
    """Structural checks of an export from anywhere (types, ranges, counters)."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise TransferError(f"{name}: {what}", name)

    need(export.version == TRANSFER_VERSION, "version",
         f"export version {export.version!r}, this engine reads version {TRANSFER_VERSION}")
    need(isinstance(export.request_id, str) and export.request_id != "", "request_id",
         "must be a non-empty string")
    for name in ("prompt_token_ids", "output_token_ids"):
        ids = getattr(export, name)
        need(isinstance(ids, list) and all(_is_int(t) and t >= 0 for t in ids), name,
             "must be a list of non-negative integers")
    need(len(export.prompt_token_ids) > 0, "prompt_token_ids", "must not be empty")
    num_tokens = len(export.prompt_token_ids) + len(export.output_token_ids)
    need(_is_int(export.num_computed_tokens) and 0 <= export.num_computed_tokens < num_tokens,
         "num_computed_tokens", f"{export.num_computed_tokens!r} must be in [0, {num_tokens})"
         " (the next step computes at least one token)")
    need(_is_int(export.max_tokens) and export.max_tokens >= len(export.output_token_ids),
         "max_tokens", f"{export.max_tokens!r} is below the {len(export.output_token_ids)} "
         "tokens already generated")
    need(_is_int(export.block_size) and export.block_size > 0, "block_size",
         f"must be a positive integer, got {export.block_size!r}")
    need(isinstance(export.params, dict), "params", "must be a dict")
    need(isinstance(export.detokenizer, dict), "detokenizer", "must be a dict")
    need(isinstance(export.model, dict), "model", "must be a dict")
    need(isinstance(export.kv_format, str), "kv_format", "must be a string")
    need(isinstance(export.kv_blocks, dict)
         and all(isinstance(t, torch.Tensor) for t in export.kv_blocks.values()),
         "kv_blocks", "must map names to tensors")
    need(export.num_computed_tokens == 0 or bool(export.kv_blocks), "kv_blocks",
         f"missing for {export.num_computed_tokens} computed tokens")
    need(export.generator_state is None or (isinstance(export.generator_state, torch.Tensor)
                                            and export.generator_state.dtype == torch.uint8),
         "generator_state", "must be a uint8 tensor or None")


def check_compatible(export: RequestExport, *, kv_format: str, block_size: int,
                     model: dict[str, Any]) -> None:
    """Refuse KV from an engine with another format, block size or model."""
    if export.kv_format != kv_format:
        raise TransferError(f"kv_format: export stores KV as {export.kv_format!r}, this engine "
                            f"as {kv_format!r}", "kv_format")
    if export.block_size != block_size:
        raise TransferError(f"block_size: export has blocks of {export.block_size} tokens, this "
                            f"engine of {block_size}", "block_size")
    if export.model_fingerprint != fingerprint(model) or export.model != model:
        keys = sorted(k for k in set(export.model) | set(model)
                      if export.model.get(k) != model.get(k))
        diffs = ", ".join(f"{k}: {export.model.get(k)!r} vs {model.get(k)!r}" for k in keys)
        raise TransferError(f"model: export is from another model ({diffs or 'fingerprint'}; "
                            "export vs this engine)", "model")


def check_block_tensors(kv_blocks: dict[str, torch.Tensor],
                        expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The exported block tensors have exactly the names, shapes and dtypes this engine's store
    would export for the same number of blocks."""
    if set(kv_blocks) != set(expected):
        raise TransferError(f"kv_blocks: tensors {sorted(kv_blocks)}, this engine's format has "
                            f"{sorted(expected)}", "kv_blocks")
    for name, (shape, dtype) in expected.items():
        t = kv_blocks[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise TransferError(f"kv_blocks: tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
                                f"expected {shape} {dtype}", "kv_blocks")


# -- bytes -----------------------------------------------------------------------------------

def to_bytes(export: RequestExport) -> bytes:
    header = {f.name: getattr(export, f.name) for f in dataclasses.fields(RequestExport)
              if f.name not in _TENSOR_FIELDS}
    tensors = {_KV_PREFIX + k: t.contiguous() for k, t in export.kv_blocks.items()}
    if export.generator_state is not None:
        tensors[_GENERATOR] = export.generator_state.contiguous()
    head = json.dumps(header, allow_nan=True).encode()
    return MAGIC + _LEN.pack(len(head)) + head + st_save(tensors)


def from_bytes(data: bytes) -> RequestExport:
    """Parse and `validate` bytes from `to_bytes`; TransferError on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TransferError(f"header: expected bytes, got {type(data).__name__}", "header")
    data = bytes(data)
    start = len(MAGIC) + _LEN.size
    if len(data) < start or data[:len(MAGIC)] != MAGIC:
        raise TransferError("header: not a kvwise request export (bad magic)", "header")
    (head_len,) = _LEN.unpack_from(data, len(MAGIC))
    if head_len > len(data) - start:
        raise TransferError(f"header: length {head_len} runs past the data", "header")
    try:
        header = json.loads(data[start:start + head_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferError(f"header: unreadable JSON ({e})", "header") from None
    if not isinstance(header, dict):
        raise TransferError("header: not a JSON object", "header")
    if header.get("version") != TRANSFER_VERSION:  # before the fields, which a version may change
        raise TransferError(f"version: export version {header.get('version')!r}, this engine "
                            f"reads version {TRANSFER_VERSION}", "version")
    try:
        tensors = st_load(data[start + head_len:])
    except SafetensorError as e:
        raise TransferError(f"kv_blocks: unreadable tensors ({e})", "kv_blocks") from None
    kv_blocks = {k[len(_KV_PREFIX):]: t for k, t in tensors.items() if k.startswith(_KV_PREFIX)}
    unknown = sorted(k for k in tensors if not k.startswith(_KV_PREFIX) and k != _GENERATOR)
    if unknown:
        raise TransferError(f"kv_blocks: unknown tensors {unknown}", "kv_blocks")
    try:
        export = RequestExport(**header, kv_blocks=kv_blocks,
                               generator_state=tensors.get(_GENERATOR))
    except TypeError as e:
        raise TransferError(f"header: fields do not match a RequestExport ({e})",
                            "header") from None
    validate(export)
    return export


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
