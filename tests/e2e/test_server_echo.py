"""`/v1/completions` with `echo` and prompt logprobs, as lm-evaluation-harness sends them.

lm-eval's `local-completions` loglikelihood posts token-id prompts with `echo: true`,
`logprobs: 1`, `max_tokens: 0` or `1`, `temperature: 0`, and reads `choices[i].logprobs`'s
`token_logprobs` / `top_logprobs` over the prompt (the first token's logprob is null). The
server's numbers must be the engine's (`LLM` with `prompt_logprobs`, same weights).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from kvwise.sampling_params import SamplingParams

ENGINE_ARGS = {"threads": 2, "max_model_len": 256, "kv_cache_memory": "64MiB",
               "weight_dtype": "fp32"}
SERVER_ARGS = ["--threads", "2", "--max-model-len", "256", "--kv-cache-memory", "64MiB",
               "--weight-dtype", "fp32", "--served-model-name", "smol"]
PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOL = 1e-4


@pytest.fixture(scope="module")
def llm() -> Any:
    from kvwise.llm import LLM

    return LLM("smollm2-135m", **ENGINE_ARGS)


@pytest.fixture()
def http(server: Any) -> Any:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.wait_drained()


def _post(http: Any, **body: Any) -> dict:
    r = http.post("/v1/completions", json={"model": "smol", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _check_prompt_part(lp: dict, ids: list[int], ref: Any) -> None:
    """The first len(ids) entries of `lp` are the prompt's, equal to the engine's `ref`."""
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        own = ref.prompt_logprobs[i][ids[i]]
        assert lp["tokens"][i] == own.decoded_token
        assert abs(lp["token_logprobs"][i] - own.logprob) <= TOL, i
        top = lp["top_logprobs"][i]
        best = min(ref.prompt_logprobs[i].values(), key=lambda x: x.rank)
        assert top.keys() == {own.decoded_token, best.decoded_token}, (i, top)
        assert abs(top[best.decoded_token] - best.logprob) <= TOL, i
    offsets = lp["text_offset"]
    assert offsets[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))


def test_echo_max_tokens_0_returns_the_prompt_and_its_logprobs(llm: Any, http: Any) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1,
                                                prompt_logprobs=1), use_tqdm=False)[0]
    r = _post(http, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    (choice,) = r["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                          "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
    assert lp["tokens"][0] == llm.get_tokenizer().decode(ids[:1])
    _check_prompt_part(lp, ids, ref)


def test_echo_with_max_tokens_3_appends_the_completion(llm: Any, http: Any) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, logprobs=1,
                                                prompt_logprobs=1), use_tqdm=False)[0]
    r = _post(http, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3)
    (choice,) = r["choices"]
    out = ref.outputs[0]
    assert choice["text"] == PROMPT + out.text
    assert r["usage"]["completion_tokens"] == 3
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    _check_prompt_part(lp, ids, ref)
    for j, tid in enumerate(out.token_ids):  # then the generated tokens' own logprobs
        assert abs(lp["token_logprobs"][len(ids) + j] - out.logprobs[j][tid].logprob) <= TOL
    plain = _post(http, prompt=PROMPT, echo=True, max_tokens=3)["choices"][0]
    assert plain["text"] == PROMPT + out.text and plain["logprobs"] is None


def test_lm_eval_loglikelihood_request(llm: Any, http: Any) -> None:
    """What lm-eval sends: a batch of token-id prompts, max_tokens 1, echo, logprobs 1; it sums
    token_logprobs[ctxlen:-1] and checks greediness against top_logprobs."""
    tok = llm.get_tokenizer()
    ctx = tok.encode("The capital of France is", add_special_tokens=False)
    prompts = [ctx + tok.encode(c, add_special_tokens=False) for c in (" Paris", " pizza")]
    r = _post(http, prompt=prompts, echo=True, logprobs=1, max_tokens=1, seed=1234)
    choices = sorted(r["choices"], key=lambda c: c["index"])
    scores = []
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the generated token
        cont = lp["token_logprobs"][len(ctx):-1]
        assert len(cont) == len(ids) - len(ctx) and all(x is not None for x in cont)
        scores.append(sum(cont))
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
    assert scores[0] > scores[1]  # Paris is likelier than pizza


def test_echo_validation(http: Any) -> None:
    for body in ({"prompt": "hi", "max_tokens": 0},  # nothing to return without echo
                 {"prompt": "hi", "echo": True, "stream": True},
                 {"prompt": "hi", "echo": True, "logprobs": 21},
                 {"prompt": "hi", "echo": True, "max_tokens": -1}):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
