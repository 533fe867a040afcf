"""`kvwise` command line: generate | chat | eval ppl|quant|kv|passkey | calibrate | bench | serve.

Invariants:
- Engine flags are declared once (kvwise.config.ENGINE_FLAGS) and map 1:1 to EngineConfig.
- User errors (bad flags, bad prompts, missing model) print one `error: ...` line to stderr and
  exit with status 2; no traceback.
- Building the parser, `--help` and argument errors import no torch, numba, transformers or
  fastapi (a test checks it): commands import what they need when they run, and engine flags are
  validated (EngineConfig) before the engine's modules load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from kvwise.calibration.command import add_calibrate_parser
from kvwise.config import EngineConfig, add_engine_args, engine_config_from_args, parse_cli_args
from kvwise.errors import KvwiseError
from kvwise.eval.passkey import PROMPT_STYLES
from kvwise.sampling_params import SamplingParams


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, max_tokens=args.max_tokens, stop=args.stop,
        stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def _make_llm(args: argparse.Namespace) -> Any:
    cfg = engine_config_from_args(args)  # a bad flag fails here, before torch loads
    from kvwise.llm import LLM

    kwargs = {k: v for k, v in vars(cfg).items() if k != "model"}
    return LLM(cfg.model, **kwargs)


def cmd_generate(args: argparse.Namespace) -> int:
    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise KvwiseError("prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    params = sampling_params_from_args(args)
    llm = _make_llm(args)
    t0 = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=not args.json)
    else:
        outs = llm.generate(prompts, params, use_tqdm=not args.json)
    dt = time.perf_counter() - t0
    num_out = 0
    for i, out in enumerate(outs):
        for c in out.outputs:
            num_out += len(c.token_ids)
            if args.json:
                print(json.dumps({"prompt_index": i, "index": c.index, "text": c.text,
                                  "token_ids": c.token_ids, "finish_reason": c.finish_reason}))
            else:
                print(c.text)
                if len(outs) > 1 or params.n > 1:
                    print("-" * 40)
    print(f"[{len(outs)} prompt(s), {num_out} tokens in {dt:.2f}s, {num_out / dt:.1f} tok/s]",
          file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    llm = _make_llm(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = args.message is None
    while True:
        if interactive:
            try:
                user = input("you> ")
            except EOFError:
                print()
                return 0
            if user.strip() in ("/exit", "/quit"):
                return 0
            if not user.strip():
                continue
        else:
            user = args.message
        history.append({"role": "user", "content": user})
        reply = _stream_reply(llm, history, params)
        history.append({"role": "assistant", "content": reply})
        if not interactive:
            return 0


def _stream_reply(llm: Any, history: list[dict[str, str]], params: SamplingParams) -> str:
    tok = llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True),
                     add_special_tokens=False)
    printed = 0
    text = ""
    first: Optional[float] = None
    t0 = time.perf_counter()
    n = 0
    print("assistant> ", end="", flush=True)
    for out in llm.stream(ids, params):
        c = out.outputs[0]
        if first is None:
            first = time.perf_counter()
        text, n = c.text, len(c.token_ids)
        print(text[printed:], end="", flush=True)
        printed = len(text)
    t1 = time.perf_counter()
    decode_rate = (n - 1) / (t1 - first) if first is not None and n > 1 and t1 > first else 0.0
    print()
    print(f"[{n} tokens, {n / (t1 - t0):.1f} tok/s overall, {decode_rate:.1f} tok/s decode, "
          f"time to first token {((first or t1) - t0) * 1000:.0f} ms]", file=sys.stderr)
    return text


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from kvwise.eval.datasets import load_text
    from kvwise.eval.perplexity import perplexity, token_chunks

    if (args.text_file is None) == (args.dataset is None):
        raise KvwiseError("eval ppl: give exactly one of --text-file FILE or --dataset NAME")
    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = load_text(args.dataset)
    llm = _make_llm(args)
    t0 = time.perf_counter()
    result = perplexity(llm.engine, text, args.context_len, args.num_chunks)
    dt = time.perf_counter() - t0
    for i, nll in enumerate(result.chunk_nlls):
        print(f"chunk={i} tokens={args.context_len} nll={nll:.6f}")
    print(f"[{result.num_tokens} tokens in {dt:.1f}s, {result.num_tokens / dt:.0f} tok/s]",
          file=sys.stderr)
    if args.compare_hf:
        from kvwise.eval.parity import hf_perplexity, load_hf_reference

        ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
        hf = load_hf_reference(llm.engine.model_source)
        hf_ppl, _ = hf_perplexity(hf, token_chunks(ids, args.context_len, args.num_chunks))
        # HF runs the file's weights dequantized to fp32; kvwise runs its resolved formats (the
        # default auto keeps a Q4_1 GGUF's blocks as int4): --weight-dtype fp32 compares like
        # with like
        fmt = llm.engine.model.weight_formats
        print(f"hf_ppl={hf_ppl:.6f} rel_diff={result.ppl / hf_ppl - 1:+.6%} "
              f"kvwise_weights={fmt.projections} kvwise_lm_head={fmt.lm_head} hf_weights=fp32")
    print(f"ppl={result.ppl:.6f}")
    return 0


def cmd_eval_quant(args: argparse.Namespace) -> int:
    from kvwise.eval.datasets import load_text
    from kvwise.eval.quant_quality import measure

    dtypes = [d for d in args.weight_dtypes.split(",") if d]
    kv_dtypes = tuple(d for d in args.kv_cache_dtypes.split(",") if d)
    act_quants = tuple(d for d in args.activation_quants.split(",") if d)
    for d in dtypes:  # a clear error before any model loads
        EngineConfig.from_kwargs(weight_dtype=d)
    for d in kv_dtypes:
        EngineConfig.from_kwargs(kv_cache_dtype=d)
    for d in act_quants:
        EngineConfig.from_kwargs(weight_dtype="int4", activation_quant=d)

    def make_llm(weight_dtype: str, kv_cache_dtype: str, activation_quant: str) -> Any:
        kv = args.kv_cache_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
        return _make_llm(argparse.Namespace(**{**vars(args), "weight_dtype": weight_dtype,
                                               "kv_cache_dtype": kv,
                                               "activation_quant": activation_quant}))

    base, results = measure(make_llm, load_text(args.dataset), dtypes, args.context_len,
                            args.num_chunks, args.num_prompts, args.prompt_len, args.max_tokens,
                            kv_dtypes, act_quants)
    print(f"quant weight_dtype=fp32 ppl={base:.6f}")
    for r in results:
        kv = "" if r.kv_cache_dtype == "auto" else f" kv_cache_dtype={r.kv_cache_dtype}"
        if r.activation_quant != "none":
            kv += f" activation_quant={r.activation_quant}"
        print(f"quant weight_dtype={r.weight_dtype}{kv} ppl={r.ppl:.6f} rel_ppl={r.rel_ppl:+.4%} "
              f"greedy_agreement={r.agreement:.4f} prompts={args.num_prompts} "
              f"tokens={args.max_tokens}")
    return 0


def cmd_eval_kv(args: argparse.Namespace) -> int:
    if (args.text_file is None) == (args.dataset is None):
        raise KvwiseError("eval kv: give exactly one of --text-file FILE or --dataset NAME")
    cfg = engine_config_from_args(args)  # bad engine flags fail before anything loads
    kv_dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    for d in kv_dtypes:
        EngineConfig.from_kwargs(kv_cache_dtype=d)
    from kvwise.eval import kv_eval, kv_peers
    from kvwise.eval.datasets import load_text

    spec = args.kv_compressions
    if spec is None:  # the engine flags' own compression (default none)
        spec = {"none": "none", "fastgen": f"fastgen:{cfg.recovery_threshold}"}.get(
            cfg.kv_compression, f"{cfg.kv_compression}:{cfg.sink_tokens}:{cfg.window_tokens}")
    settings = kv_eval.kvwise_settings(kv_dtypes, kv_eval.parse_kv_compressions(spec))
    peers = kv_peers.parse_peers(args.peers) if args.peers else []
    kv_peers.check_available(peers)
    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = load_text(args.dataset)

    def make_llm(kv_cache_dtype: str) -> Any:
        return _make_llm(argparse.Namespace(**{**vars(args), "kv_cache_dtype": kv_cache_dtype}))

    base_ppl: list[float] = []  # the baseline's, measured first

    def report(r: kv_eval.KVEvalResult) -> None:
        base_ppl.append(r.ppl)
        line = json.dumps(r.as_json()) if args.json else kv_eval.format_line(r, base_ppl[0])
        print(line, flush=True)

    _, windows, base_argmax = kv_eval.measure_kvwise(
        make_llm, text, args.context_len, args.continuation_len, args.num_windows, settings,
        report)
    if peers:
        import torch

        from kvwise.model.loader import resolve_model_path

        kv_peers.measure_peers(peers, resolve_model_path(cfg.model), windows, base_argmax,
                               cfg.threads or torch.get_num_threads(), report)
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    cfg = engine_config_from_args(args)  # bad engine flags fail before anything loads
    kv_dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    if not kv_dtypes:
        raise KvwiseError("kv_cache_dtypes: give at least one KV format, e.g. float16,nuq3-1%")
    for d in kv_dtypes:
        EngineConfig.from_kwargs(kv_cache_dtype=d)
    lens = [n.strip() for n in args.context_lens.split(",") if n.strip()]
    if not lens or not all(n.isdigit() and int(n) >= 1 for n in lens):
        raise KvwiseError(f"context_lens: give a comma list of token counts >= 1, e.g. "
                          f"2048,4096,7168; got {args.context_lens!r}")
    if args.trials < 1:
        raise KvwiseError(f"trials: must be >= 1, got {args.trials}")
    from kvwise.eval import passkey

    def make_llm(kv_cache_dtype: str) -> Any:
        return _make_llm(argparse.Namespace(**{**vars(args), "kv_cache_dtype": kv_cache_dtype}))

    def report(r: passkey.PasskeyResult) -> None:
        print(json.dumps(r.as_json()) if args.json else passkey.format_line(r), flush=True)

    passkey.measure(make_llm, kv_dtypes, [int(n) for n in lens], args.trials, cfg.seed,
                    args.prompt_style, report)
    return 0


def cmd_inspect_kv(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_file is None):
        raise KvwiseError("inspect kv: give exactly one of --prompt TEXT or --prompt-file FILE")
    if args.output is not None and not args.output.endswith(".png"):
        raise KvwiseError(f"inspect kv: --output must name a .png file, got {args.output!r}")
    params = sampling_params_from_args(args)
    text = args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    if not text:
        raise KvwiseError("inspect kv: the prompt is empty")
    llm = _make_llm(args)
    from kvwise.eval import inspect_kv

    ids = llm.get_tokenizer().encode(text)
    choices = inspect_kv.fastgen_choices(llm, ids, params)
    for c in choices:
        print(json.dumps(c.as_json()) if args.json else inspect_kv.format_line(c))
    kept = sum(c.kept_fraction for c in choices) / len(choices)
    print(f"# {len(ids)} prompt tokens, kept fraction {kept:.4f} over {len(choices)} groups",
          file=sys.stderr)
    if args.output:
        inspect_kv.draw(choices, args.output, f"{len(ids)} tokens, kept {kept:.3f}")
        print(f"# wrote {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one or many prompts")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    p.add_argument("--message", help="send one message, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="evaluation")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("ppl", help="perplexity of a text file through the engine's cache path")
    e.add_argument("--text-file", help="a UTF-8 text file")
    e.add_argument("--dataset", help="built-in text: pydoc-topics | bible-kjv")
    e.add_argument("--compare-hf", action="store_true",
                   help="also compute HF transformers perplexity on the same chunks (HF runs "
                        "the weights as fp32: add --weight-dtype fp32 to compare like with like)")
    e.add_argument("--context-len", type=int, default=1024)
    e.add_argument("--num-chunks", type=int, default=8)
    add_engine_args(e)
    e.set_defaults(func=cmd_eval_ppl)
    e = esub.add_parser("quant", help="quantized weights vs fp32: perplexity and greedy agreement")
    e.add_argument("--weight-dtypes", default="int8,int4", help="comma list to compare with fp32")
    e.add_argument("--kv-cache-dtypes", default="auto",
                   help="cross them with these KV cache dtypes, e.g. auto,float16 (the fp32 "
                        "base keeps --kv-cache-dtype)")
    e.add_argument("--activation-quants", default="none",
                   help="cross the int4 entries with these, e.g. none,int8; int8 activations "
                        "apply to steps of <= 16 tokens, so score with "
                        "--max-num-batched-tokens 16 to measure them")
    e.add_argument("--dataset", default="pydoc-topics", help="pydoc-topics | bible-kjv")
    e.add_argument("--context-len", type=int, default=1024)
    e.add_argument("--num-chunks", type=int, default=8)
    e.add_argument("--num-prompts", type=int, default=8, help="greedy-agreement prompts")
    e.add_argument("--prompt-len", type=int, default=32, help="tokens per agreement prompt")
    e.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    add_engine_args(e)
    e.set_defaults(func=cmd_eval_quant)
    e = esub.add_parser("kv", help="KV-cache settings: prefill a context, teacher-force a "
                                   "continuation; ppl, agreement with fp32, bytes, seconds")
    e.add_argument("--text-file", help="a UTF-8 text file")
    e.add_argument("--dataset", help="built-in text: pydoc-topics | bible-kjv")
    e.add_argument("--context-len", type=int, default=512, help="tokens prefilled per window")
    e.add_argument("--continuation-len", type=int, default=512,
                   help="tokens teacher-forced one per step after the context")
    e.add_argument("--num-windows", type=int, default=2, help="disjoint, evenly spaced windows")
    e.add_argument("--kv-cache-dtypes", default="float32,float16,int8",
                   help="comma list of KV formats (the float32 baseline always runs)")
    e.add_argument("--kv-compressions", default=None,
                   help="comma list crossed with the dtypes: none | streaming:SINK:WINDOW "
                        "(default: the engine flags' --kv-compression)")
    e.add_argument("--peers", default=None,
                   help="comma list: quanto (HF QuantizedCache int4,int2) | llamacpp (q8_0, "
                        "q4_0, q4_1, iq4_nl), or one type as quanto:int4; each peer's own "
                        "unquantized baseline runs too (needs `make peers`)")
    e.add_argument("--json", action="store_true", help="one JSON object per setting")
    add_engine_args(e)
    e.set_defaults(func=cmd_eval_kv)
    e = esub.add_parser("passkey", help="passkey retrieval: a number hidden in filler text, "
                                        "asked at the end; accuracy per KV format and length "
                                        "(--seed picks the passkeys and their depths)")
    e.add_argument("--context-lens", default="2048,4096,7168",
                   help="comma list of prompt lengths in tokens (exact)")
    e.add_argument("--trials", type=int, default=20, help="prompts per length")
    e.add_argument("--kv-cache-dtypes", default="float16,nuq3-1%",
                   help="comma list of KV formats; every one sees the same prompts")
    e.add_argument("--prompt-style", choices=PROMPT_STYLES, default="plain",
                   help="plain text, or wrapped in the model's chat template")
    e.add_argument("--json", action="store_true", help="one JSON object per setting")
    add_engine_args(e)
    e.set_defaults(func=cmd_eval_passkey)

    p = sub.add_parser("inspect", help="look inside the engine for one prompt")
    isub = p.add_subparsers(dest="inspect_kind", required=True)
    e = isub.add_parser("kv", help="FastGen's policy per (layer, KV head) for one prompt")
    e.add_argument("--prompt", help="prompt text")
    e.add_argument("--prompt-file", help="file whose text is the prompt")
    e.add_argument("--output", help="write the policy map as a PNG here")
    e.add_argument("--json", action="store_true", help="one JSON object per group")
    add_engine_args(e)
    add_sampling_args(e)
    e.set_defaults(func=cmd_inspect_kv)

    add_calibrate_parser(sub)
    _add_optional(sub, "kvwise.bench.cli", "add_bench_parser")
    _add_optional(sub, "kvwise.serving.cli", "add_serve_parser")
    return parser


def _add_optional(sub: Any, module: str, fn: str) -> None:
    import importlib

    try:
        getattr(importlib.import_module(module), fn)(sub)
    except (ImportError, AttributeError):
        pass


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_cli_args(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
