"""Tokenizer: text <-> ids and chat-template rendering, built from GGUF metadata or an HF dir.

The ids come from a `tokenizers.Tokenizer` (Rust) that we assemble ourselves from GGUF metadata
(byte-level BPE for `tokenizer.ggml.model == "gpt2"`, SentencePiece-style BPE with byte fallback
for "llama") or load from `tokenizer.json`. Chat templates are rendered with a sandboxed jinja2
environment configured like `transformers` (trim_blocks, lstrip_blocks, loopcontrols, `tojson`,
`raise_exception`, `strftime_now`).

Invariants:
- `encode(text, add_special_tokens=True)` adds BOS/EOS only as the model's metadata says
  (`tokenizer.ggml.add_bos_token` / `add_eos_token`, or `tokenizer_config.json` /
  `tokenizer.json`'s post-processor). A chat prompt from `apply_chat_template` already holds its
  special tokens: encode it with `add_special_tokens=False`.
- Special tokens written in the text (e.g. "<|im_start|>") always encode to their single id.
- `eos_token_ids` starts with the model's eos id, then eot/eom and `generation_config.json` ids,
  then vocabulary tokens llama.cpp treats as end-of-generation by text (`<|im_end|>`,
  `<|endoftext|>`, `<|eot_id|>`, ...); no duplicates.
- A model without a chat template gets `FALLBACK_CHAT_TEMPLATE`: one "role: content" line per
  message, then "assistant:" when a generation prompt is asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from kvwise.errors import ConfigError, InvalidRequestError, ModelNotFoundError, WeightLoadError
from kvwise.model.gguf_reader import (
    END_OF_GENERATION_TEXTS,
    GGUFReaderKV,
    gguf_end_of_generation_ids,
)

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (llama.cpp llama-vocab.cpp, `regex_exprs`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# Pre-types whose first llama.cpp regex is "\p{N}": every digit is its own pre-token.
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva")
# llama.cpp sets `ignore_merges` for the llama3 pre-type (a whole-word vocab hit wins).
_IGNORE_MERGES_PRES = ("llama3", "llama-bpe", "llama-v3")

_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 2, 3, 4


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in HF).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e}", param="chat_template") from e


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: Optional[str],
                 eos_token: Optional[str], extra_eos_ids: Sequence[int] = (),
                 chat_template: Optional[str] = None,
                 template_tokens: Optional[dict[str, str]] = None) -> None:
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: Optional[int] = self.token_to_id(bos_token) if bos_token else None
        eos_id = self.token_to_id(eos_token) if eos_token else None
        eos_ids = ([eos_id] if eos_id is not None else []) + list(extra_eos_ids)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        eos_ids += [i for i, tok in sorted(added.items()) if tok.content in END_OF_GENERATION_TEXTS]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        special = {i for i, tok in added.items() if tok.special}
        special |= set(self.eos_token_ids)
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        self.all_special_ids: frozenset[int] = frozenset(special)
        self.chat_template: Optional[str] = chat_template
        self._template = _compile_template(chat_template or FALLBACK_CHAT_TEMPLATE)
        self._template_tokens = {"bos_token": bos_token or "", "eos_token": eos_token or "",
                                 **(template_tokens or {})}

    # ---- ids ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a str, got {type(text).__name__}",
                                      param="prompt")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        tokens = [] if bad else [self._backend.id_to_token(i) for i in ids]
        if bad or any(t is None for t in tokens):
            bad = bad or [i for i, t in zip(ids, tokens) if t is None]
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary "
                                      f"(size {self.vocab_size})", param="ids")
        return tokens  # type: ignore[return-value]

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` ([{"role": ..., "content": ...}, ...])."""
        _validate_messages(messages)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._template_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}",
                                      param="messages") from e

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        return cls.from_gguf_metadata(GGUFReaderKV(path).metadata, source=path)

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], source: str = "<gguf>") -> Tokenizer:
        kind = md.get("tokenizer.ggml.model")
        tokens: list[str] = md.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise WeightLoadError(f"{source}: no tokenizer.ggml.tokens in metadata")
        types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, merges, md.get("tokenizer.ggml.pre"))
            default_add_bos = False
        elif kind == "llama":
            scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            unk_id = md.get("tokenizer.ggml.unknown_token_id")
            backend = _sentencepiece_bpe(
                tokens, merges or _merges_from_scores(tokens, scores),
                unk=tokens[unk_id] if unk_id is not None else None,
                add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)))
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise WeightLoadError(f"{source}: tokenizer model {kind!r} is not supported "
                                  "(supported: gpt2, llama)")
        special_types = (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN)
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, ty in zip(tokens, types) if ty in special_types])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED])

        def token(key: str) -> Optional[str]:
            i = md.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        _set_post_processor(backend, bos if md.get("tokenizer.ggml.add_bos_token",
                                                   default_add_bos) else None,
                            eos if md.get("tokenizer.ggml.add_eos_token", False) else None)
        all_eos = gguf_end_of_generation_ids(md)
        template_tokens = {k: v for k, v in (("unk_token", token("unknown_token_id")),
                                             ("pad_token", token("padding_token_id"))) if v}
        return cls(backend, bos_token=bos, eos_token=eos, extra_eos_ids=all_eos,
                   chat_template=md.get("tokenizer.chat_template"),
                   template_tokens=template_tokens)

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ModelNotFoundError(f"no tokenizer.json in {path} (a SentencePiece-only "
                                     "tokenizer.model is not supported)")
        try:
            backend = BackendTokenizer.from_file(tok_file)
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise WeightLoadError(f"{tok_file}: cannot parse tokenizer ({e})") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))

        def token(key: str) -> Optional[str]:
            value = cfg.get(key, special_map.get(key))
            return value.get("content") if isinstance(value, dict) else value

        bos, eos = token("bos_token"), token("eos_token")
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            # transformers rebuilds the post-processor in exactly these cases
            _set_post_processor(backend, bos if cfg.get("add_bos_token") else None,
                                eos if cfg.get("add_eos_token") else None)
        gen = _read_json(os.path.join(path, "generation_config.json"))
        gen_eos = gen.get("eos_token_id")
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        template_tokens = {k: v for k in ("unk_token", "pad_token") if (v := token(k))}
        return cls(backend, bos_token=bos, eos_token=eos, extra_eos_ids=extra,
                   chat_template=_hf_chat_template(path, cfg), template_tokens=template_tokens)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InvalidRequestError(f"messages[{i}] needs a string {key!r}",
                                          param="messages")


def _set_post_processor(backend: BackendTokenizer, bos: Optional[str], eos: Optional[str]) -> None:
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"]
                                   + ([f"{eos}:1"] if eos else []))
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=specials)


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, ...]],
                    pre: Optional[str]) -> BackendTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                          ignore_merges=pre in _IGNORE_MERGES_PRES))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"), byte_level])
    elif pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:  # "gpt2", "default" and unknown pre-types: GPT-2's regex
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], merges: list[tuple[str, ...]], unk: Optional[str],
                       add_space_prefix: bool) -> BackendTokenizer:
    """SentencePiece BPE as transformers' LlamaTokenizer builds it (Metaspace, byte fallback)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                          fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    best piece score first (transformers `generate_merges`)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: invalid JSON ({e})") from e


def _hf_chat_template(path: str, cfg: dict[str, Any]) -> Optional[str]:
    """chat_template.jinja (transformers >= 4.50 saves it there), else tokenizer_config.json."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template") or _read_json(
        os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
