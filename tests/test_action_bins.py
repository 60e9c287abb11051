"""Equal-frequency action bins of the VLA's action head (lapa_training.vla.action_bins)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lapa_training.vla.action_bins import ACTION_NAMES, IGNORE_INDEX, ActionBins


def skewed_actions(n: int, seed: int = 0) -> np.ndarray:
    """Seven differently shaped, skewed columns; the gripper a continuous closure in [0, 1]."""
    rng = np.random.default_rng(seed)
    a = np.empty((n, 7))
    a[:, 0] = rng.exponential(0.01, n)
    a[:, 1] = rng.lognormal(-5.0, 1.0, n) - 0.002
    a[:, 2] = rng.normal(0.0, 0.01, n) ** 3
    a[:, 3] = rng.gamma(0.5, 0.02, n)
    a[:, 4] = -rng.exponential(0.05, n)
    a[:, 5] = rng.standard_t(2.0, n) * 0.01
    a[:, 6] = rng.beta(0.3, 0.3, n)
    return a


def test_equal_frequency_bins_on_skewed_data():
    train = skewed_actions(25_600, seed=0)
    bins = ActionBins.fit(train, num_bins=256)
    assert bins.num_bins == (256,) * 6 + (2,)
    expected = len(train) / 256
    for d in range(6):
        counts = np.bincount(bins.encode(train)[:, d], minlength=256)
        assert counts.min() >= expected - 2 and counts.max() <= expected + 2, (ACTION_NAMES[d], counts.min(),
                                                                               counts.max())
        # held-out data from the same distribution fills the bins evenly too (expected 100, sd 10)
        held_out = np.bincount(bins.encode(skewed_actions(25_600, seed=1))[:, d], minlength=256)
        assert held_out.min() > 0.5 * expected and held_out.max() < 1.6 * expected
        # ... which uniform bins over the range would not: the skew is real
        uniform = np.histogram(train[:, d], bins=256)[0]
        assert uniform.max() > 5 * expected


@pytest.mark.parametrize("value", ["center", "median", "mean"])
def test_round_trip_error_within_the_bin(value):
    train = skewed_actions(20_000, seed=2)
    bins = ActionBins.fit(train, num_bins=64, value=value)
    # probe the whole data range, not just training values: a dense grid per dimension
    lo, hi = train.min(axis=0), train.max(axis=0)
    probe = lo + (hi - lo) * np.linspace(0.0, 1.0, 5001)[:, None]
    ids = bins.encode(probe)
    err = np.abs(bins.decode(ids).astype(np.float64) - probe)[:, :6]
    width = bins.bin_widths(ids)[:, :6]
    scale = np.abs(probe[:, :6]).max(axis=0) * 1e-6  # float32 decode
    if value == "center":
        assert np.all(err <= 0.5 * width + scale)
    else:  # a bin's median/mean lies inside the bin
        assert np.all(err <= width + scale)
    # and on the training values themselves the typical error is below half a bin
    ids = bins.encode(train)
    err = np.abs(bins.decode(ids).astype(np.float64) - train)[:, :6]
    assert np.all(np.median(err, axis=0) < 0.5 * np.median(bins.bin_widths(ids)[:, :6], axis=0))


def test_peaky_data_merges_duplicate_edges_and_reports_effective_bins():
    rng = np.random.default_rng(3)
    n = 10_000
    a = rng.normal(0.0, 0.01, (n, 7))
    a[rng.random(n) < 0.4, 0] = 0.0  # 40 % exact zeros: ~100 quantile edges at 0
    a[:, 1] = np.round(rng.normal(0.0, 1.0, n), 1)  # a few dozen distinct values
    a[:, 2] = 0.25  # constant
    a[:, 6] = (rng.random(n) < 0.3).astype(float)
    bins = ActionBins.fit(a, num_bins=256)
    nb = bins.num_bins
    assert nb[0] < 256 and nb[1] < len(np.unique(a[:, 1])) + 1 and nb[2] == 1 and nb[3] == 256
    assert bins.requested_bins[:6] == (256,) * 6
    assert "dx" in bins.summary() and f"{nb[0]}/256" in bins.summary()
    ids = bins.encode(a)
    for d in range(6):
        counts = np.bincount(ids[:, d], minlength=nb[d])
        assert len(counts) == nb[d] and counts.min() > 0, f"{ACTION_NAMES[d]} has empty bins"
        assert np.array_equal(counts, bins.dims[d].counts)
    # the point mass at zero has a bin of its own, holding exactly the zeros, decoded exactly
    zero_ids = bins.encode(np.zeros((1, 7)))
    assert np.count_nonzero(ids[:, 0] == zero_ids[0, 0]) == np.count_nonzero(a[:, 0] == 0.0)
    assert bins.decode(zero_ids)[0, 0] == 0.0
    # a discrete dimension decodes every one of its frequent values exactly
    values, freq = np.unique(a[:, 1], return_counts=True)
    frequent = values[freq > n / 256]
    probe = np.zeros((len(frequent), 7))
    probe[:, 1] = frequent
    np.testing.assert_allclose(bins.decode(bins.encode(probe))[:, 1], frequent, atol=1e-6)
    assert bins.decode(bins.encode(a[:5]))[:, 2].tolist() == [0.25] * 5


def test_gripper_is_binary_by_default_and_quantile_on_request():
    rng = np.random.default_rng(4)
    a = rng.normal(0.0, 0.01, (4000, 7))
    a[:, 6] = rng.uniform(0.0, 1.0, 4000)
    bins = ActionBins.fit(a, num_bins=32)
    assert bins.num_bins[6] == 2 and bins.dims[6].kind == "binary"
    ids = bins.encode(a)[:, 6]
    np.testing.assert_array_equal(ids, (a[:, 6] >= 0.5).astype(int))
    assert set(bins.decode(bins.encode(a))[:, 6].tolist()) == {0.0, 1.0}
    # a gripper that never closed still keeps both classes
    a[:, 6] = 0.0
    assert ActionBins.fit(a, num_bins=32).num_bins[6] == 2
    a[:, 6] = rng.uniform(0.0, 1.0, 4000)
    quant = ActionBins.fit(a, num_bins=32, gripper_bins=8, gripper_threshold=0.3)
    assert quant.num_bins[6] == 8 and quant.dims[6].kind == "quantile"
    thresh = ActionBins.fit(a, num_bins=32, gripper_threshold=0.3)
    np.testing.assert_array_equal(thresh.encode(a)[:, 6], (a[:, 6] >= 0.3).astype(int))


def test_nan_rows_are_ignored_and_map_to_the_ignore_index():
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, (3000, 7))
    with_nan = a.copy()
    with_nan[::3, 2] = np.nan  # missing actions (e.g. the last frame of every episode)
    fitted = ActionBins.fit(with_nan, num_bins=16)
    clean = ActionBins.fit(np.delete(a, np.s_[::3], axis=0), num_bins=16)
    assert fitted == clean and fitted.num_samples == 2000
    ids = fitted.encode(with_nan)
    assert np.all(ids[::3, 2] == IGNORE_INDEX) and np.all(ids[1::3] >= 0)
    decoded = fitted.decode(ids)
    assert np.isnan(decoded[::3, 2]).all() and np.isfinite(decoded[1::3]).all()
    with pytest.raises(ValueError, match="no action rows"):
        ActionBins.fit(np.full((10, 7), np.nan))


def test_save_load_is_plain_json_and_exact(tmp_path):
    a = skewed_actions(5000, seed=6)
    bins = ActionBins.fit(a, num_bins=100, value="mean")
    path = bins.save(tmp_path / "bins.json")
    json.loads(path.read_text())  # plain JSON, nothing pickled
    loaded = ActionBins.load(path)
    assert loaded == bins and loaded.num_bins == bins.num_bins and loaded.value_mode == "mean"
    np.testing.assert_array_equal(loaded.encode(a), bins.encode(a))
    np.testing.assert_array_equal(loaded.decode(bins.encode(a)), bins.decode(bins.encode(a)))
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="bad.json"):
        ActionBins.load(tmp_path / "bad.json")


def test_bad_arguments_give_clear_errors():
    a = np.zeros((100, 7))
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2"):
        ActionBins.fit(a, num_bins=1)
    with pytest.raises(ValueError, match="gripper_bins must be an integer >= 2"):
        ActionBins.fit(a, gripper_bins=1)
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        ActionBins.fit(np.zeros((100, 6)))
    with pytest.raises(ValueError, match="value must be one of"):
        ActionBins.fit(a, value="mode")
    bins = ActionBins.fit(np.random.default_rng(0).normal(size=(100, 7)), num_bins=4)
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)"):
        bins.decode(np.array([[4, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="integer bin ids"):
        bins.decode(np.zeros((1, 7)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 7\)"):
        bins.encode(np.zeros((3, 5)))
