"""KVQuant calibration fitting: reproducible, the paper's rules for ranges, datatypes and
Q-Norm, and a file that refuses to load when it is broken."""

from __future__ import annotations

import json

import pytest
import torch

from kvwise.cache.kvquant.calibration import (
    Calibration,
    CalibrationError,
    LayerActivations,
    fit_calibration,
)
from kvwise.cache.kvquant.quantizer import nearest_codes, normalize
from kvwise.kv_names import parse_format_name

K, D = 2, 16
IDENT = {"model": "t", "num_layers": 2, "num_kv_heads": K, "head_dim": D}


def _acts(seed: int, layers: int = 2) -> list[LayerActivations]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(3, 40, K, D, generator=g) * torch.linspace(0.5, 3, D)  # channel scales
        k[:, 0] = 50.0  # the sink position: must not shape any table
        v = torch.randn(3, 40, K, D, generator=g)
        out.append(LayerActivations(k, v, torch.rand(k.shape, generator=g),
                                    torch.rand(v.shape, generator=g)))
    return out


SPECS = [parse_format_name(n) for n in ("nuq3-1%", "nuq2", "int4", "nuq4")]


def test_same_seed_same_file_other_seed_other_tables():
    a = fit_calibration(_acts(0), SPECS, seed=0, model_identity=IDENT, source={})
    b = fit_calibration(_acts(0), SPECS, seed=0, model_identity=IDENT, source={})
    c = fit_calibration(_acts(0), SPECS, seed=1, model_identity=IDENT, source={})
    assert a.to_json() == b.to_json()
    assert a.formats["nuq2"] != c.formats["nuq2"] or a.formats["nuq3-1%"] != c.formats["nuq3-1%"]


def test_key_ranges_are_the_trimmed_channel_quantiles_without_the_sink():
    acts = _acts(0)
    cal = fit_calibration(acts, SPECS, seed=0, model_identity=IDENT, source={})
    k = acts[1].k[:, 1:].reshape(-1, K, D).double()  # sink position 0 left out
    lo = torch.quantile(k.reshape(k.shape[0], -1), 0.005, dim=0).view(K, D)
    hi = torch.quantile(k.reshape(k.shape[0], -1), 0.995, dim=0).view(K, D)
    zero = torch.tensor(cal.key_ranges["1"]["zero"][1])
    scale = torch.tensor(cal.key_ranges["1"]["scale"][1])
    torch.testing.assert_close(zero, ((hi + lo) / 2).float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(scale, ((hi - lo) / 2).float(), rtol=2e-3, atol=2e-3)
    full = cal.key_ranges["0"]  # no outliers: min and max
    torch.testing.assert_close(torch.tensor(full["scale"][1]),
                               ((k.amax(0) - k.amin(0)) / 2).float(), rtol=2e-3, atol=2e-3)


def test_datatypes_are_sorted_in_range_and_uniform_for_int():
    cal = fit_calibration(_acts(0), SPECS, seed=0, model_identity=IDENT, source={})
    for name, f in cal.formats.items():
        for key in ("k_levels", "v_levels"):
            t = torch.tensor(f[key])
            assert (t[:, 1:] >= t[:, :-1]).all() and t.abs().max() <= 1.0 + 1e-6, name
    assert cal.formats["int4"]["k_levels"][0] == torch.linspace(-1, 1, 16).tolist()
    # Q-Norm only at 2 bits: read values differ from the levels there, nowhere else
    assert cal.formats["nuq2"]["k_values"] != cal.formats["nuq2"]["k_levels"]
    assert cal.formats["nuq3-1%"]["k_values"] == cal.formats["nuq3-1%"]["k_levels"]


def test_qnorm_matches_mean_and_std_of_the_calibration_elements():
    acts = _acts(3, layers=1)
    ident = {**IDENT, "num_layers": 1}
    cal = fit_calibration(acts, [parse_format_name("nuq2")], seed=0, model_identity=ident,
                          source={})
    tables = cal.layer_tables(parse_format_name("nuq2"))[0]
    k = acts[0].k[:, 1:].reshape(-1, K, D)
    u = normalize(k, tables.k_zero, tables.k_scale).clamp(-1, 1).reshape(-1)
    q = tables.k_dtype.values[nearest_codes(u, tables.k_dtype.levels).long()]
    assert abs(q.mean() - u.mean()) < 1e-3 and abs(q.std() / u.std() - 1) < 1e-3


def test_the_weighting_moves_the_centroids():
    """Fisher weights matter: weighting only the positive elements pulls the levels up."""
    acts = _acts(0)
    heavy = [LayerActivations(a.k, a.v, (a.k > 0).float() + 1e-6, (a.v > 0).float() + 1e-6)
             for a in acts]
    spec = [parse_format_name("nuq3")]
    plain = fit_calibration(acts, spec, seed=0, model_identity=IDENT, source={})
    skew = fit_calibration(heavy, spec, seed=0, model_identity=IDENT, source={})
    mean = lambda c: torch.tensor(c.formats["nuq3"]["v_levels"]).mean()  # noqa: E731
    assert mean(skew) > mean(plain) + 0.1


def test_load_refuses_broken_files(tmp_path):
    cal = fit_calibration(_acts(0), SPECS, seed=0, model_identity=IDENT, source={})
    good = tmp_path / "good.json"
    cal.save(str(good))
    back = Calibration.load(str(good))
    assert back.to_json() == cal.to_json()
    with pytest.raises(CalibrationError, match="missing.json: no such"):
        Calibration.load(str(tmp_path / "missing.json"))
    doc = json.loads(good.read_text())
    cases = {
        "kind": {**doc, "kind": "other"},
        "version": {**doc, "version": 99},
        "shape": {**doc, "formats": {**doc["formats"], "nuq2": {
            **doc["formats"]["nuq2"], "k_levels": [[0.0, 1.0]] * 2}}},
        "unsorted": {**doc, "formats": {**doc["formats"], "nuq2": {
            **doc["formats"]["nuq2"], "k_levels": [[0.5, 0.1, 0.2, 0.3]] * 2}}},
        "nan": {**doc, "key_ranges": {**doc["key_ranges"], "0": {
            **doc["key_ranges"]["0"], "zero": [[[float("nan")] * D] * K] * 2}}},
    }
    for name, bad in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(bad))
        with pytest.raises(CalibrationError, match=f"{name}.json"):
            Calibration.load(str(p))
    with pytest.raises(CalibrationError, match="made for a model with"):
        back.check_model(30, K, D)
    with pytest.raises(CalibrationError, match="no tables for kv_cache_dtype 'nuq2-1%'"):
        back.layer_tables(parse_format_name("nuq2-1%"))
