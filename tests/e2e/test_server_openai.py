"""The real server (`python -m kvwise.serving.cli serve`) with the default model, end to end.

Talks to it with the official `openai` client and httpx: completions, chat, streaming with and
without usage, n > 1, seeds, stop strings, logprobs, greedy parity with `LLM.generate`/`chat`,
64 concurrent streams, disconnect -> abort -> blocks freed, the validation matrix of RELIABILITY
#1 and a bounded hypothesis fuzz. After every test the pool has no used block.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwise.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
ENGINE_ARGS = {"threads": 2, "max_model_len": MAX_MODEL_LEN, "kv_cache_memory": "128MiB"}
SERVER_ARGS = ["--threads", "2", "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory", "128MiB", "--served-model-name", "smollm2-135m",
               "--served-model-name", "smol"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def llm() -> Any:
    from kvwise.llm import LLM

    return LLM("smollm2-135m", **ENGINE_ARGS)


@pytest.fixture(scope="module")
def oai(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture()
def http(server: Any) -> Any:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.wait_drained()


def greedy(max_tokens: int = 8, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_greedy_completions_equal_llm_generate(llm: Any, oai: openai.OpenAI, http: Any) -> None:
    outs = llm.generate(PROMPTS, greedy(8), use_tqdm=False)
    r = oai.completions.create(model="smol", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        o.outputs[0].text for o in outs]
    assert r.model == "smol"
    assert r.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in outs)
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in outs)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    r = oai.completions.create(model="smollm2-135m", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == outs[0].outputs[0].text


def test_greedy_chat_equals_llm_chat(llm: Any, oai: openai.OpenAI, http: Any) -> None:
    ref = llm.chat(CHAT, greedy(8), use_tqdm=False)[0]
    r = oai.chat.completions.create(model="smol", messages=CHAT, max_completion_tokens=8,
                                    temperature=0)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    tok = http.post("/tokenize", json={"messages": CHAT}).json()
    assert tok["tokens"] == ref.prompt_token_ids and tok["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": ref.outputs[0].token_ids}).json()[
        "prompt"].startswith(ref.outputs[0].text)


def test_streaming_equals_non_streaming(oai: openai.OpenAI, http: Any) -> None:
    full = oai.completions.create(model="smol", prompt=PROMPTS[2], max_tokens=6, temperature=0)
    chunks = list(oai.completions.create(model="smol", prompt=PROMPTS[2], max_tokens=6,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)
    chunks = list(oai.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    ref = oai.chat.completions.create(model="smol", messages=CHAT, max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == \
        ref.choices[0].message.content


def test_n_seed_reproducible(oai: openai.OpenAI, http: Any) -> None:
    def run(seed: int) -> list[str]:
        r = oai.completions.create(model="smol", prompt=PROMPTS[2], max_tokens=8, n=3,
                                   temperature=1.0, seed=seed)
        assert sorted(c.index for c in r.choices) == [0, 1, 2]
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    a, b = run(1234), run(1234)
    assert a == b
    assert len(set(a)) > 1 or run(99) != a  # siblings (or seeds) differ
    # the same through streaming
    texts = {0: "", 1: "", 2: ""}
    for c in oai.completions.create(model="smol", prompt=PROMPTS[2], max_tokens=8, n=3,
                                    temperature=1.0, seed=1234, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert [texts[i] for i in range(3)] == a


def test_stop_strings_and_stop_tokens(oai: openai.OpenAI, http: Any) -> None:
    full = oai.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=10,
                                  temperature=0).choices[0].text
    stop = full.strip().split()[1]
    cut = oai.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                 stop=[stop])
    c = cut.choices[0]
    assert c.finish_reason == "stop" and full.startswith(c.text) and stop not in c.text
    assert c.model_extra.get("stop_reason") == stop
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
        model="smol", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=stop, stream=True))
    assert streamed == c.text


def test_logprobs(oai: openai.OpenAI, http: Any) -> None:
    r = oai.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                               logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for val, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and val <= 0
        assert val == pytest.approx(max(top.values()), abs=1e-4)  # greedy = the top-1 token
    r = oai.chat.completions.create(model="smol", messages=CHAT, max_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) for t in content)
    chunks = list(oai.chat.completions.create(model="smol", messages=CHAT, max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs
                for t in ch.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_64_concurrent_streams(oai: openai.OpenAI, server: Any, http: Any) -> None:
    refs = {p: oai.completions.create(model="smol", prompt=p, max_tokens=4,
                                      temperature=0).choices[0].text for p in PROMPTS}

    async def one(c: httpx.AsyncClient, prompt: str) -> str:
        text = ""
        async with c.stream("POST", "/v1/completions", json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, PROMPTS[i % 3]) for i in range(64)))

    texts = asyncio.run(main())
    assert texts == [refs[PROMPTS[i % 3]] for i in range(64)]


def test_disconnect_mid_stream_frees_blocks(server: Any, http: Any) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPTS[1]}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        before = server.stats()["generation_tokens_total"]
        with http.stream("POST", path, json={**body, "max_tokens": 200, "n": 2,
                                             "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept referenced: dropping it closes the connection
            for _ in range(6):
                next(lines)
            assert server.stats()["num_running"] == 2  # both siblings still generating
        stats = server.wait_drained(timeout=20)
        assert stats["generation_tokens_total"] - before < 2 * 200  # stopped early
    # a non-streaming client that gives up is aborted too
    before = server.stats()["generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 200,
                                           "ignore_eos": True}, timeout=1.0)
    assert server.wait_drained(timeout=20)["generation_tokens_total"] - before < 200
    metrics = http.get("/metrics").text
    assert 'kvwise:request_success_total{finished_reason="abort",model_name="smollm2-135m"} 3.0' \
        in metrics


def test_bench_serve_runs(server: Any, tmp_path: Any, capsys: Any) -> None:
    """`kvwise bench serve --url ...` runs against this server (a benchmark is not a test)."""
    import argparse

    from kvwise.bench.serving import add_serving_bench_parser

    parser = argparse.ArgumentParser()
    add_serving_bench_parser(parser.add_subparsers(dest="kind"))
    out = tmp_path / "serve.json"
    args = parser.parse_args(["serve", "--url", server.url, "--engines", "kvwise",
                              "--dataset", "pydoc", "--num-prompts", "4", "--max-tokens", "4",
                              "--request-rates", "8", "--output-md", "none", "--chart", "none",
                              "--output-json", str(out)])
    assert args.func(args) == 0
    (summary,) = json.loads(out.read_text())["rates"]
    assert summary["num_failed"] == 0 and summary["output_tok_s"] > 0
    assert summary["mean_output_tokens"] == 4
    assert "attainment=" in capsys.readouterr().out
    server.wait_drained()


def _count(http: Any, prompt: str) -> int:
    return http.post("/tokenize", json={"prompt": prompt}).json()["count"]


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_validation_matrix(http: Any) -> None:
    n = _count(http, PROMPTS[0])
    for delta, status in ((-1, 200), (0, 200), (1, 400)):
        r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "temperature": 0,
                                               "max_tokens": MAX_MODEL_LEN - n + delta})
        assert r.status_code == status, (delta, r.text)
        if status == 400:
            err = r.json()["error"]
            assert str(MAX_MODEL_LEN) in err["message"] and err["param"] == "max_tokens"
    long_prompt = " hello" * (MAX_MODEL_LEN + 5)
    err = _err(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}), 400)
    assert str(MAX_MODEL_LEN) in err["message"]
    for body in ({"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 10**12},
                 {"temperature": -1}, {"top_p": 0}, {"top_p": 1.01}, {"n": 0},
                 {"logprobs": 50}, {"prompt": [10**6]}, {"prompt": ""}, {"stop": [""]}):
        err = _err(http.post("/v1/completions", json={"prompt": "hi", **body}), 400)
        assert err["type"] == "invalid_request_error"
    _err(http.post("/v1/completions", content=b'{"prompt": ', headers={
        "content-type": "application/json"}), 400)
    _err(http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT}), 404)
    assert http.get("/v1/models").json()["data"][1]["id"] == "smol"
    assert http.get("/health").status_code == 200  # still serving


_small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(-5, 5) | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                              max_size=2), max_leaves=6)
_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["smol", "x"]), "prompt": st.text(max_size=30) | st.lists(
        st.integers(-2, 50000), max_size=5) | _small_json,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(
        ["user", "assistant", "system", "tool"]), "content": st.text(max_size=20) | _small_json}),
        max_size=3) | _small_json,
    "max_tokens": st.integers(-2, 2), "temperature": st.floats(-1, 3) | _small_json,
    "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-2, 60000) | _small_json,
    "min_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 2), "seed": _small_json,
    "stop": _small_json, "stop_token_ids": _small_json, "logprobs": _small_json,
    "top_logprobs": st.integers(-1, 25), "stream": st.booleans(), "ignore_eos": _small_json,
})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(body=_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions",
                                           "/tokenize", "/detokenize"]))
def test_fuzz_no_5xx(server: Any, body: dict, path: str) -> None:
    body.setdefault("max_tokens", 2)  # bounded run time on CPU
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzz_left_server_clean(server: Any) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_drained()


def test_streaming_kv_compression_per_request(llm: Any, oai: openai.OpenAI, http: Any) -> None:
    """kvwise's extra body: `kv_compression` / `sink_tokens` / `window_tokens` per request; the
    same as LLM.generate with those SamplingParams; bad settings get 400 naming the field."""
    extra = {"kv_compression": "streaming", "sink_tokens": 4, "window_tokens": 32}
    ref = llm.generate(PROMPTS[:1], greedy(80, **extra), use_tqdm=False)[0].outputs[0].text
    r = oai.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=80, temperature=0,
                               extra_body=extra)
    assert r.choices[0].text == ref
    for body, field in (({"kv_compression": "streaming"}, "window_tokens"),
                        ({"kv_compression": "h2o", "window_tokens": 8}, "kv_compression"),
                        ({"kv_compression": "streaming", "window_tokens": 0}, "window_tokens"),
                        ({"sink_tokens": -1}, "sink_tokens")):
        err = _err(http.post("/v1/completions", json={"prompt": "hi", **body}), 400)
        assert err["param"] == field, (body, err)
