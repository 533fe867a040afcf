"""A request prefilled here leaves as bytes and is decoded by an engine in a second process
(DistServe-style prefill/decode split over a file), with the tokens it would have had here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kvwise import SamplingParams
from kvwise.config import EngineConfig
from kvwise.engine import transfer
from kvwise.engine.engine import LLMEngine

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(model="smollm2-135m", threads=2, weight_dtype="int8", max_model_len=256,
              num_blocks=32, kv_cache_dtype="float16")
CASES = {
    "greedy": SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=16, temperature=0.9, seed=77, ignore_eos=True),
}

# Engine B in its own process: import each file's request, decode all, print tokens as JSON.
DECODE = textwrap.dedent("""
    import json, sys
    from kvwise.config import EngineConfig
    from kvwise.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(**json.loads(sys.argv[1])))
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            engine.import_request(f.read())
    engine.check_integrity()
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    engine.check_integrity()
    print(json.dumps({"tokens": tokens, "blocks_used": engine.stats()["num_blocks_used"]}))
""")


def _finish(engine: LLMEngine, rid: str) -> list[int]:
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.outputs[0].token_ids


def test_request_decoded_in_a_second_process(tmp_path: Path) -> None:
    engine = LLMEngine(EngineConfig(**CONFIG))
    prompt = engine.tokenizer.encode("A list of the planets of the solar system, in order "
                                     "from the sun, with one fact about each: Mercury is")
    refs, paths = {}, []
    for name, params in CASES.items():
        engine.add_request(f"ref-{name}", prompt, params, cache_salt="reference")
        refs[name] = _finish(engine, f"ref-{name}")
        engine.add_request(name, prompt, params, hold_after_prefill=True)
        while not engine.step():
            pass
        path = tmp_path / f"{name}.kvreq"
        path.write_bytes(transfer.to_bytes(engine.export_request(name)))
        paths.append(str(path))
    assert engine.stats()["num_blocks_used"] == 0
    engine.check_integrity()

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", DECODE, json.dumps(CONFIG), *paths],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == refs
    assert result["blocks_used"] == 0
