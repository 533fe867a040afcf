"""KVQuant calibration: fitting the formats' tables from offline activations, and its file.

`fit_calibration` takes one `LayerActivations` per layer (captured by `kvwise calibrate`,
kvwise.calibration.capture) and computes, as in KVQuant §3 (Hooper et al. 2024):
- per (layer, KV head, channel) key ranges: the outlier fraction's lower and upper quantiles
  (half of it on each side; min and max without outliers), as fp16 zero and scale;
- per layer and per format, the key and value datatypes: 2^bits centroids of a 1-D k-means
  over the normalized dense elements (outliers left out), each weighted by its diagonal Fisher
  information times the square of its vector's scale (so an element counts by how much its
  rounding error moves the loss); uniform grids for the `int` formats; for 2-bit nuq, Q-Norm
  (the read values are the levels affinely corrected so that the dequantized calibration
  elements have the mean and standard deviation of the originals).
The first `sink_tokens` positions of every sample are left out (they stay fp16 at run time).

Invariants:
- Deterministic: the same activations, specs and seed give the same file, byte for byte (the
  k-means runs single-threaded on a seeded subsample of at most `MAX_POINTS` elements).
- `Calibration.load` refuses a file that is missing, not JSON, of another version, or lacking
  a format or a layer, with an error naming the file and what is wrong; `check_model` refuses
  one made for another model shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvwise.cache.kvquant.quantizer import (
    Datatype,
    fp16_range,
    nearest_codes,
    normalize,
    uniform_datatype,
    value_ranges,
)
from kvwise.kv_names import KVQuantSpec, parse_format_name

FILE_KIND = "kvwise-kv-calibration"
FILE_VERSION = 1
MAX_POINTS = 1 << 17  # elements per (layer, K or V) the k-means sees
DEFAULT_SINK_TOKENS = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used (the message names the file and the problem)."""


@dataclass
class LayerActivations:
    """One layer's calibration activations, sample-major (position p of sample s at [s, p]).

    k: pre-RoPE keys (the k projection's output, bias included) [num_samples, context_len, K, D]
    v: values [num_samples, context_len, K, D]
    k_fisher, v_fisher: the diagonal Fisher information of each element, i.e. the squared
        gradient of the sample's mean next-token NLL with respect to it (same shapes).
    All float32 on CPU."""

    k: torch.Tensor
    v: torch.Tensor
    k_fisher: torch.Tensor
    v_fisher: torch.Tensor


def key_outliers(spec: KVQuantSpec, head_dim: int) -> int:
    """Outlier slots per (token, KV head) for keys: twice the expected count (the per-channel
    thresholds are fixed, so a vector's count varies), rounded up."""
    return _ceil(2 * spec.outlier_fraction * head_dim)


def value_outliers(spec: KVQuantSpec, head_dim: int) -> int:
    """Outlier slots per (token, KV head) for values (chosen per vector: exactly this many)."""
    return _ceil(spec.outlier_fraction * head_dim)


def _ceil(x: float) -> int:
    n = int(x)
    return n + 1 if x > n + 1e-9 else n


@dataclass
class LayerTables:
    """What one layer of one format needs at run time."""

    k_zero: torch.Tensor  # [K, D] fp16
    k_scale: torch.Tensor  # [K, D] fp16
    k_dtype: Datatype
    v_dtype: Datatype


@dataclass
class Calibration:
    model: dict[str, Any]
    source: dict[str, Any]
    sink_tokens: int
    key_ranges: dict[str, dict[str, list]]  # outlier percent -> zero, scale [L][K][D]
    formats: dict[str, dict[str, list]]  # format name -> k_levels, k_values, v_... [L][2^b]
    path: Optional[str] = field(default=None, compare=False)

    # -- run time ---------------------------------------------------------------------------

    def layer_tables(self, spec: KVQuantSpec) -> list[LayerTables]:
        where = self.path or "calibration"
        if spec.name not in self.formats:
            raise CalibrationError(f"{where}: has no tables for kv_cache_dtype {spec.name!r} "
                                   f"(it has {sorted(self.formats)}); run `kvwise calibrate "
                                   f"--kv-cache-dtype {spec.name}`")
        ranges = self.key_ranges[_pct_key(spec.outlier_percent)]
        f = self.formats[spec.name]
        out = []
        for i in range(len(f["k_levels"])):
            out.append(LayerTables(
                torch.tensor(ranges["zero"][i], dtype=torch.float32).half(),
                torch.tensor(ranges["scale"][i], dtype=torch.float32).half(),
                Datatype(torch.tensor(f["k_levels"][i]), torch.tensor(f["k_values"][i])),
                Datatype(torch.tensor(f["v_levels"][i]), torch.tensor(f["v_values"][i]))))
        return out

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        want = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        got = {k: self.model.get(k) for k in want}
        if got != want:
            raise CalibrationError(f"{self.path or 'calibration'}: made for a model with {got}, "
                                   f"this model has {want} (model {self.model.get('model')!r})")

    # -- the file -----------------------------------------------------------------------------

    def to_json(self) -> str:
        doc = {"kind": FILE_KIND, "version": FILE_VERSION, "model": self.model,
               "source": self.source, "sink_tokens": self.sink_tokens,
               "key_ranges": self.key_ranges, "formats": self.formats}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: str) -> Calibration:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path}: not a readable calibration file ({e})") from None
        if not isinstance(doc, dict) or doc.get("kind") != FILE_KIND:
            raise CalibrationError(f"{path}: not a kvwise KV calibration file")
        if doc.get("version") != FILE_VERSION:
            raise CalibrationError(f"{path}: version {doc.get('version')!r}, this kvwise reads "
                                   f"version {FILE_VERSION}")
        try:
            cal = cls(dict(doc["model"]), dict(doc["source"]), int(doc["sink_tokens"]),
                      doc["key_ranges"], doc["formats"], path)
            cal._check_shapes()
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"{path}: malformed calibration ({e!r})") from None
        return cal

    def _check_shapes(self) -> None:
        layers = self.model["num_layers"]
        k, d = self.model["num_kv_heads"], self.model["head_dim"]
        for pct, r in self.key_ranges.items():
            for name in ("zero", "scale"):
                t = torch.tensor(r[name], dtype=torch.float32)
                if tuple(t.shape) != (layers, k, d) or not torch.isfinite(t).all():
                    raise ValueError(f"key_ranges[{pct}].{name} must be finite [{layers}, {k}, "
                                     f"{d}], got {tuple(t.shape)}")
        for name, f in self.formats.items():
            spec = parse_format_name(name)
            if spec is None:
                raise ValueError(f"unknown format {name!r}")
            if _pct_key(spec.outlier_percent) not in self.key_ranges:
                raise ValueError(f"format {name!r} has no key ranges")
            for key in ("k_levels", "k_values", "v_levels", "v_values"):
                t = torch.tensor(f[key], dtype=torch.float32)
                if tuple(t.shape) != (layers, spec.num_levels) or not torch.isfinite(t).all():
                    raise ValueError(f"{name}.{key} must be finite [{layers}, "
                                     f"{spec.num_levels}], got {tuple(t.shape)}")
                if key.endswith("levels") and not (t[:, 1:] >= t[:, :-1]).all():
                    raise ValueError(f"{name}.{key} must be sorted")


def _pct_key(percent: float) -> str:
    return f"{percent:g}"


# -- fitting ------------------------------------------------------------------------------------

def fit_calibration(layers: Sequence[LayerActivations], specs: Sequence[KVQuantSpec], *,
                    seed: int, model_identity: dict[str, Any], source: dict[str, Any],
                    sink_tokens: int = DEFAULT_SINK_TOKENS) -> Calibration:
    """-> the tables of every spec for every layer (see module docstring)."""
    if not layers or not specs:
        raise ValueError("fit_calibration needs at least one layer and one format")
    key_ranges: dict[str, dict[str, list]] = {}
    formats: dict[str, dict[str, list]] = {s.name: {"k_levels": [], "k_values": [],
                                                    "v_levels": [], "v_values": []}
                                           for s in specs}
    for pct in sorted({s.outlier_percent for s in specs}):
        key_ranges[_pct_key(pct)] = {"zero": [], "scale": []}
    for li, acts in enumerate(layers):
        k, v, fk, fv = (_drop_sink(t, sink_tokens) for t in
                        (acts.k, acts.v, acts.k_fisher, acts.v_fisher))  # [n, K, D]
        zs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for pct, r in key_ranges.items():
            zero, scale = _key_range(k, float(pct) / 100.0)  # [K, D] fp16
            zs[pct] = zero, scale
            r["zero"].append(zero.float().tolist())
            r["scale"].append(scale.float().tolist())
        for spec in specs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + li)
            zero, scale = zs[_pct_key(spec.outlier_percent)]
            uk = normalize(k, zero, scale)  # [n, K, D]
            wk = fk * scale.float() ** 2
            # the elements the run time keeps dense: all (clamped) without outliers, else
            # those inside the range (the others are kept exactly, up to the slot count)
            kdense = uk.abs() <= 1.0 if spec.outlier_percent else torch.ones_like(
                uk, dtype=torch.bool)
            kdt = _fit_datatype(spec, uk, wk, kdense, seed, gen)
            c = value_outliers(spec, v.shape[-1])
            lo, hi, out = value_ranges(v, c)
            vz, vs = fp16_range(lo, hi)  # [n, K]
            uv = normalize(v, vz[..., None], vs[..., None])
            dense = torch.ones_like(uv, dtype=torch.bool).scatter(-1, out, False)
            wv = fv * vs.float()[..., None] ** 2
            vdt = _fit_datatype(spec, uv, wv, dense, seed, gen)
            f = formats[spec.name]
            f["k_levels"].append(kdt.levels.tolist())
            f["k_values"].append(kdt.values.tolist())
            f["v_levels"].append(vdt.levels.tolist())
            f["v_values"].append(vdt.values.tolist())
    return Calibration(dict(model_identity), dict(source), sink_tokens, key_ranges, formats)


def _drop_sink(t: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """[samples, P, K, D] -> [samples * (P - sink), K, D] float32."""
    return t[:, sink_tokens:].reshape(-1, *t.shape[2:]).float()


def _key_range(k: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k [n, K, D] -> zero, scale [K, D] fp16 of the per-channel range that leaves out
    `fraction` of the elements (half below, half above)."""
    flat = k.reshape(k.shape[0], -1)  # [n, K*D]
    if fraction == 0:
        lo, hi = flat.amin(0), flat.amax(0)
    else:
        q = torch.tensor([fraction / 2, 1 - fraction / 2], dtype=torch.float32)
        lo, hi = torch.quantile(flat, q, dim=0)  # [K*D] each
    zero, scale = fp16_range(lo, hi)
    return zero.view(k.shape[1:]), scale.view(k.shape[1:])


def _fit_datatype(spec: KVQuantSpec, u: torch.Tensor, w: torch.Tensor, dense: torch.Tensor,
                  seed: int, gen: torch.Generator) -> Datatype:
    """The datatype of one layer's keys or values from normalized elements u, weights w and
    the mask of dense (non-outlier) elements, all [n, K, D]."""
    if spec.kind == "int":
        return uniform_datatype(spec.bits)
    x = u[dense].clamp(-1.0, 1.0)
    weight = w[dense]
    if x.numel() > MAX_POINTS:
        pick = torch.randperm(x.numel(), generator=gen)[:MAX_POINTS]
        x, weight = x[pick], weight[pick]
    levels = _weighted_kmeans(x, weight, spec.num_levels, seed)
    values = levels
    if spec.bits == 2:  # Q-Norm: match the dequantized mean and std to the originals
        q = levels[nearest_codes(x, levels).long()]
        sq = q.std()
        a = x.std() / sq if sq > 0 else torch.tensor(1.0)
        values = levels * a + (x.mean() - q.mean() * a)
    return Datatype(levels.float(), values.float())


def _weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted centroids [k] float32 of a 1-D Fisher-weighted k-means (scikit-learn; k-means++
    init, 50 iterations, as KVQuant's calibration)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    pts = x.double().numpy().reshape(-1, 1)
    wts = w.double().numpy()
    if wts.sum() <= 0:
        wts = None  # no gradient signal (e.g. a dead layer): plain k-means
    if torch.unique(x).numel() < k:  # fewer distinct points than centroids
        return torch.linspace(-1.0, 1.0, k, dtype=torch.float32)
    with threadpool_limits(1):
        km = KMeans(n_clusters=k, n_init=1, max_iter=50, random_state=seed)
        km.fit(pts, sample_weight=wts)
    centers = torch.tensor(km.cluster_centers_[:, 0], dtype=torch.float32)
    return torch.sort(centers).values


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
