"""`kvwise inspect kv`: what FastGen chose for one prompt, per (layer, KV head).

Runs the prompt through the engine with `--kv-compression fastgen` (the engine's own profiling
inside its step, nothing re-implemented here), stops right after the profile, and reports per
group: the chosen policy, its recovery, and the fraction of the prompt's KV it keeps. With
`--output F.png` it draws the policy map (layers x KV heads, one colour per policy) beside the
kept fraction per group.

Invariants:
- The request is the engine's own (SamplingParams with the engine's resolution of the
  compression settings); it is aborted after the profile, so its blocks go back to the pool.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from kvwise.errors import InvalidRequestError
from kvwise.sampling_params import SamplingParams

RESULT_KEYS = ("layer", "kv_head", "policy", "recovery", "kept_fraction")


@dataclass(frozen=True)
class GroupChoice:
    layer: int
    kv_head: int
    policy: str
    recovery: float
    kept_fraction: float

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RESULT_KEYS}


def fastgen_choices(llm: Any, prompt: list[int], params: SamplingParams) -> list[GroupChoice]:
    """Profile `prompt` (token ids) through the engine; -> one choice per (layer, KV head)."""
    if (params.kv_compression or llm.engine.config.kv_compression) != "fastgen":
        raise InvalidRequestError("kv_compression: inspect kv needs fastgen (set "
                                  "--kv-compression fastgen)", "kv_compression")
    eng = llm.engine
    rid = "inspect-kv"
    eng.add_request(rid, prompt, dataclasses.replace(params, max_tokens=1))
    req = eng.scheduler.find(rid)
    policy = req.kv_policy
    try:
        while policy.groups is None and eng.has_unfinished_requests():
            eng.step()
    finally:
        eng.abort_request(rid)
    if policy.groups is None:
        raise InvalidRequestError("prompt: the request ended before its profile", "prompt")
    n = len(prompt)
    kh = policy.num_kv_heads
    out = []
    for g, (grp, name) in enumerate(zip(policy.groups, policy.policies)):
        layer, head = divmod(g, kh)
        rec = float(policy.recoveries[layer, head, policy.candidates.index(name)])
        kept = grp.positions.shape[0] if name != "full" else n
        out.append(GroupChoice(layer, head, name, rec, kept / n))
    return out


def format_line(c: GroupChoice) -> str:
    return (f"layer={c.layer:<3} kv_head={c.kv_head} policy={c.policy:<30} "
            f"recovery={c.recovery:.4f} kept_fraction={c.kept_fraction:.4f}")


def draw(choices: list[GroupChoice], path: str, title: Optional[str] = None) -> None:
    """The policy map (layers x KV heads) and the kept fraction per group, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from kvwise.cache.compress.fastgen import CANDIDATES

    layers = max(c.layer for c in choices) + 1
    heads = max(c.kv_head for c in choices) + 1
    index = {name: i for i, name in enumerate(CANDIDATES)}
    grid = [[0] * heads for _ in range(layers)]
    kept = [[0.0] * heads for _ in range(layers)]
    for c in choices:
        grid[c.layer][c.kv_head] = index.get(c.policy, len(CANDIDATES) - 1)
        kept[c.layer][c.kv_head] = c.kept_fraction
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, max(4, layers * 0.22)))
    cmap = ListedColormap(["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#cccccc"])
    ax1.imshow(grid, cmap=cmap, vmin=0, vmax=len(CANDIDATES) - 1, aspect="auto")
    ax1.set_xlabel("KV head")
    ax1.set_ylabel("layer")
    ax1.set_title("policy")
    ax1.set_xticks(range(heads))
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(CANDIDATES))]
    ax1.legend(handles, CANDIDATES, fontsize=6, loc="upper center",
               bbox_to_anchor=(0.5, -0.08), ncol=2)
    im = ax2.imshow(kept, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax2.set_xlabel("KV head")
    ax2.set_title("kept fraction")
    ax2.set_xticks(range(heads))
    fig.colorbar(im, ax=ax2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
