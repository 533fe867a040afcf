"""Requests leave one engine and continue in another (export / import, held for send, leases),
and two engines in one process do not disturb each other.

Token equality is exact: the reference and the transferred request run the same computation
(a whole-prompt prefill with nothing cached, then batch-1 decode steps), so any difference is a
transfer bug. A reference that hit the prefix cache would prefill fewer tokens through another
kernel path, which is why references use a `cache_salt` of their own (no hit) or run in the
importing engine before the transfer.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kvwise import SamplingParams
from kvwise.config import EngineConfig
from kvwise.engine import transfer
from kvwise.engine.engine import LLMEngine
from kvwise.errors import InvalidRequestError, TransferError

KV_CACHE_DTYPES = ["float32", "float16", "int8"]  # every KV format an export must carry
BASE = dict(model="smollm2-135m", threads=2, weight_dtype="int8", max_model_len=256,
            num_blocks=64, max_num_batched_tokens=256)
BLOCK = 16
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, seed=1234, ignore_eos=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def engines():
    """get(name, **config overrides) -> one engine per name for the whole module."""
    made: dict[str, LLMEngine] = {}

    def get(name: str, **overrides) -> LLMEngine:
        if name not in made:
            made[name] = LLMEngine(EngineConfig(**{**BASE, **overrides}), clock=FakeClock())
        return made[name]

    yield get
    made.clear()


@pytest.fixture(params=KV_CACHE_DTYPES)
def pair(request, engines) -> tuple[LLMEngine, LLMEngine]:
    kv = request.param
    return engines(f"a-{kv}", kv_cache_dtype=kv), engines(f"b-{kv}", kv_cache_dtype=kv)


def prompt(seed: int, n: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 20000, (n,), generator=g).tolist()


def finish(engine: LLMEngine, rid: str) -> list[int]:
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                engine.check_integrity()
                return out.outputs[0].token_ids


def run_alone(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams,
              cache_salt: str | None = None) -> list[int]:
    engine.add_request(rid, ids, params, cache_salt=cache_salt)
    return finish(engine, rid)


def prefill_held(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams,
                 lease_s: float = 30.0) -> None:
    engine.add_request(rid, ids, params, hold_after_prefill=True, lease_s=lease_s)
    while not engine.step():
        pass
    assert engine.step() == []  # parked: the next step schedules nothing for it
    assert engine.stats()["num_held"] == 1
    engine.check_integrity()


def test_held_request_continues_in_another_engine(pair):
    """Greedy, through bytes; the importing engine has nothing of the prompt cached."""
    a, b = pair
    ids = prompt(1)
    ref = run_alone(a, "ref", ids, GREEDY, cache_salt="ref")
    used_a = a.stats()["num_blocks_used"]
    prefill_held(a, "r", ids, GREEDY)
    assert a.stats()["num_blocks_used"] == used_a + 3  # 40 prompt tokens in blocks of 16
    data = transfer.to_bytes(a.export_request("r"))
    assert a.stats()["num_blocks_used"] == used_a and a.stats()["num_held"] == 0
    assert not a.has_unfinished_requests()
    a.check_integrity()
    b.import_request(data)
    b.check_integrity()
    assert finish(b, "r") == ref
    assert b.stats()["num_blocks_used"] == 0
    assert b.stats()["num_blocks_cached"] >= 40 // BLOCK  # imported full blocks joined the tree


def test_seeded_request_continues_where_the_prompt_is_cached(pair):
    """Seeded sampling (the generator's state travels); the importer already caches the
    prompt, so the imported full blocks are duplicates and the request adopts them."""
    a, b = pair
    ids = prompt(2)
    ref = run_alone(b, "ref-seeded", ids, SEEDED)
    hits = b.stats()["prefix_hit_tokens"]
    prefill_held(a, "s", ids, SEEDED)
    export = a.export_request("s")
    assert export.generator_state is not None and export.num_computed_tokens == 40
    b.import_request(export)
    b.check_integrity()
    assert finish(b, "s") == ref
    assert b.stats()["prefix_hit_tokens"] == hits  # no prefix match on import: KV came along


def test_running_request_exported_mid_decode(engines, num_steps=3):
    """A running (not held) request leaves between two decode steps."""
    a = engines("a-float32", kv_cache_dtype="float32")
    b = engines("b-float32", kv_cache_dtype="float32")
    ids = prompt(3, n=37)
    ref = run_alone(a, "ref-mid", ids, SEEDED, cache_salt="mid")
    a.add_request("m", ids, SEEDED)
    for _ in range(num_steps):
        a.step()
    export = a.export_request("m")
    assert len(export.output_token_ids) == num_steps
    assert export.num_computed_tokens == 37 + num_steps - 1
    assert a.stats()["num_blocks_used"] == 0
    b.import_request(transfer.from_bytes(transfer.to_bytes(export)))
    assert finish(b, "m") == ref
    a.check_integrity()


def test_bytes_round_trip(engines):
    a = engines("a-float32", kv_cache_dtype="float32")
    a.add_request("rt", prompt(4, n=20), SamplingParams(max_tokens=4, seed=5, logprobs=2,
                                                        stop=["zz"]))
    a.step()
    export = a.export_request("rt")
    back = transfer.from_bytes(transfer.to_bytes(export))
    for f in dataclasses.fields(export):
        x, y = getattr(export, f.name), getattr(back, f.name)
        if f.name == "kv_blocks":
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        elif f.name == "generator_state":
            assert torch.equal(x, y)
        else:
            assert x == y, f.name
    assert back.logprobs is not None and len(back.logprobs) == 1


def test_lease_expiry_frees_the_blocks(engines):
    a = engines("a-float32", kv_cache_dtype="float32")
    clock = a.clock
    before = a.stats()
    prefill_held(a, "lease", prompt(5, n=40), GREEDY, lease_s=5.0)
    held = a.stats()
    assert held["num_blocks_used"] == before["num_blocks_used"] + 3
    clock.now += 4.9
    a.step()
    assert a.stats()["num_held"] == 1
    clock.now += 0.2
    a.step()  # the lease has passed: aborted at the top of this step
    after = a.stats()
    assert after["num_held"] == 0 and not a.has_unfinished_requests()
    assert after["num_blocks_used"] == before["num_blocks_used"]
    assert after["num_blocks_cached"] == before["num_blocks_cached"] + 2  # full chunks stay
    assert after["num_blocks_free"] == before["num_blocks_free"] - 2
    assert after["num_expired_leases"] == before["num_expired_leases"] + 1
    a.check_integrity()
    with pytest.raises(TransferError) as e:
        a.export_request("lease")
    assert e.value.field == "request_id"


def test_export_past_the_lease_is_refused_and_frees(engines):
    a = engines("a-float32", kv_cache_dtype="float32")
    before = a.stats()["num_blocks_used"]
    prefill_held(a, "late", prompt(6, n=20), GREEDY, lease_s=1.0)
    a.clock.now += 1.0
    with pytest.raises(TransferError) as e:
        a.export_request("late")
    assert e.value.field == "lease"
    assert a.stats()["num_blocks_used"] == before and not a.has_unfinished_requests()
    a.check_integrity()


def test_hold_arguments_are_validated(engines):
    a = engines("a-float32", kv_cache_dtype="float32")
    with pytest.raises(InvalidRequestError) as e:
        a.add_request("h", [5, 6], SamplingParams(n=2), hold_after_prefill=True)
    assert e.value.param == "n"
    with pytest.raises(InvalidRequestError) as e:
        a.add_request("h", [5, 6], GREEDY, hold_after_prefill=True, lease_s=0)
    assert e.value.param == "lease_s"
    assert not a.has_unfinished_requests()


def test_two_engines_do_not_disturb_each_other(engines):
    """Engine y's unseeded and seeded outputs are engine x's (same config) although a third
    engine was created and sampled in between; no process-wide torch.manual_seed is involved."""
    x = engines("x")
    y = engines("y")
    unseeded = SamplingParams(max_tokens=8, temperature=0.9, ignore_eos=True)
    seeded = dataclasses.replace(unseeded, seed=99)
    ref = [run_alone(x, f"{i}", prompt(7 + i, n=12), p)
           for i, p in enumerate([unseeded, seeded, unseeded])]
    got = [run_alone(y, "0", prompt(7, n=12), unseeded)]
    z = engines("bs8", block_size=8)
    state = torch.get_rng_state()
    torch.manual_seed(12345)  # the caller moving the global RNG changes nothing either
    run_alone(z, "z", prompt(7, n=12), unseeded)
    torch.set_rng_state(state)
    got += [run_alone(y, f"{i}", prompt(7 + i, n=12), p)
            for i, p in [(1, seeded), (2, unseeded)]]
    assert got == ref


def _refused(engine: LLMEngine, data, field: str) -> None:
    before = engine.stats()
    with pytest.raises(TransferError) as e:
        engine.import_request(data)
    assert e.value.field == field, str(e.value)
    assert engine.stats() == before
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


@pytest.fixture(scope="module")
def held_export(engines):
    """A float32 request prefilled and exported by engine a, and its reference tokens."""
    a = engines("a-float32", kv_cache_dtype="float32")
    ids = prompt(8)
    ref = run_alone(a, "ref-mismatch", ids, GREEDY, cache_salt="mismatch")
    prefill_held(a, "mm", ids, GREEDY)
    return a.export_request("mm"), ref


def test_mismatched_imports_are_refused(engines, held_export):
    export, ref = held_export
    data = transfer.to_bytes(export)
    other_block = engines("bs8", block_size=8)
    _refused(other_block, data, "block_size")
    other_format = engines("b-float16", kv_cache_dtype="float16")
    _refused(other_format, data, "kv_format")
    b = engines("b-float32", kv_cache_dtype="float32")
    other_model = dict(export.model, weight_dtype="fp32")
    _refused(b, dataclasses.replace(export, model=other_model), "model")
    head_len = int.from_bytes(data[8:16], "little")
    corrupt = bytearray(data)
    corrupt[16 + head_len // 2] ^= 0xFF
    _refused(b, bytes(corrupt), "header")
    _refused(b, b"not an export", "header")
    header = json.loads(data[16:16 + head_len])
    header["version"] = 99
    new_head = json.dumps(header).encode()
    _refused(b, data[:8] + len(new_head).to_bytes(8, "little") + new_head
             + data[16 + head_len:], "version")
    short = {k: t[:, :-1] for k, t in export.kv_blocks.items()}  # one row missing
    _refused(b, dataclasses.replace(export, kv_blocks=short), "kv_blocks")
    wide = dict(export.kv_blocks, k=torch.zeros_like(export.kv_blocks["k"][..., :1]))
    _refused(b, dataclasses.replace(export, kv_blocks=wide), "kv_blocks")
    _refused(b, dataclasses.replace(export, num_computed_tokens=41), "num_computed_tokens")
    # After every refusal the engine is as it was: the genuine export still goes through.
    b.import_request(data)
    b.check_integrity()
    assert finish(b, "mm") == ref


def test_model_identity_uses_the_resolved_weight_formats(tmp_path):
    """`auto` on a Q4_1 GGUF is int4: an auto engine and an int4 one agree; fp32 does not, and
    batch-invariant mode (other prefill numerics) is part of the identity."""
    from kvwise.engine.model_setup import WeightFormats

    @dataclasses.dataclass
    class Arch:
        num_layers: int = 2

    src = tmp_path / "m.gguf"
    src.write_bytes(b"0" * 10)
    auto = transfer.model_identity(str(src), Arch(), EngineConfig(weight_dtype="auto"),
                                   WeightFormats("int4", "int8"))
    int4 = transfer.model_identity(str(src), Arch(), EngineConfig(weight_dtype="int4"),
                                   WeightFormats("int4", "int8"))
    fp32 = transfer.model_identity(str(src), Arch(), EngineConfig(weight_dtype="fp32"),
                                   WeightFormats("fp32", "fp32"))
    inv = transfer.model_identity(str(src), Arch(), EngineConfig(batch_invariant=True),
                                  WeightFormats("int4", "int8"))
    assert transfer.fingerprint(auto) == transfer.fingerprint(int4)
    assert auto["weight_dtype"] == "int4" and auto["lm_head_dtype"] == "int8"
    assert transfer.fingerprint(fp32) != transfer.fingerprint(auto)
    assert transfer.fingerprint(inv) != transfer.fingerprint(auto)
