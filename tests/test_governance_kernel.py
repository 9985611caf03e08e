"""The fused kernel against a numpy reference, and merged snapshots against one stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.governance._kernels import (
    BIN_GRID_CELLS,
    RULE_ALLOWED,
    RULE_INF,
    RULE_MAX,
    RULE_MIN,
    RULE_NAN,
    Accumulator,
)
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.sketches import SketchSet
from lockgate.governance.state import TensorState, WindowState, merge_all

DTYPES = [np.float32, np.float64, np.int32, np.int64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 3.0, 1e30, -1e30]


# ---------------------------------------------------------------- numpy reference
def reference(x: np.ndarray, lo, hi, allow_nan, allow_inf, allowed, edges) -> dict:
    """Straightforward numpy/Python implementation of the kernel's documented semantics."""
    v = x.astype(np.float64)
    rows, F = v.shape
    out = {k: np.zeros(F, dtype=np.int64) for k in ("count", "nan", "inf", "below", "above")}
    out.update(sum=np.zeros(F), m2=np.zeros(F), min=np.full(F, np.inf), max=np.full(F, -np.inf), bins=[])
    for j in range(F):
        col = v[:, j]
        finite = col[np.isfinite(col)]
        out["count"][j] = finite.size
        out["nan"][j] = np.isnan(col).sum()
        out["inf"][j] = np.isinf(col).sum()
        notnan = col[~np.isnan(col)]
        out["below"][j] = (notnan < lo[j]).sum()
        out["above"][j] = (notnan > hi[j]).sum()
        if finite.size:
            out["sum"][j] = finite.sum()
            out["m2"][j] = ((finite - finite.mean()) ** 2).sum()
            out["min"][j] = finite.min()
            out["max"][j] = finite.max()
        e = np.asarray(edges[j], dtype=np.float64)
        out["bins"].append(np.bincount(np.searchsorted(e, finite, side="right"), minlength=e.size + 1))
    out["bins"] = np.concatenate(out["bins"])
    violations = []
    for i in range(rows):
        for j in range(F):
            value = v[i, j]
            raw = x[i, j]
            if math.isnan(value):
                if not allow_nan[j]:
                    violations.append((i, j, RULE_NAN))
                continue
            code = RULE_MIN if value < lo[j] else RULE_MAX if value > hi[j] else 0
            if math.isinf(value):
                if not allow_inf[j]:
                    code = RULE_INF
            elif code == 0 and allowed[j] is not None:
                if np.issubdtype(x.dtype, np.integer):
                    ok = int(raw) in allowed[j]
                else:
                    ok = value == math.floor(value) and abs(value) < 9.2e18 and int(value) in allowed[j]
                if not ok:
                    code = RULE_ALLOWED
            if code:
                violations.append((i, j, code))
    out["violations"] = violations
    return out


# ---------------------------------------------------------------- strategies
@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    F = draw(st.integers(1, 5))
    rows = draw(st.integers(0, 30))
    is_float = np.issubdtype(dtype, np.floating)
    edges, lo, hi, allow_nan, allow_inf, allowed = [], [], [], [], [], []
    for _ in range(F):
        e = sorted(set(draw(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 7.0]), max_size=6))))
        edges.append(e)
        lo.append(draw(st.one_of(st.none(), st.sampled_from([-2.5, -1.0, 0.0]))))
        hi.append(draw(st.one_of(st.none(), st.sampled_from([1.0, 2.5, 3.0]))))
        allow_nan.append(draw(st.booleans()))
        allow_inf.append(draw(st.booleans()))
        allowed.append(draw(st.one_of(st.none(), st.sets(st.integers(-3, 3), min_size=1, max_size=4))))
    boundary = [v for v in [*SPECIAL, *[x for e in edges for x in e], *[b for b in lo + hi if b is not None]]]
    if is_float:
        element = st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.sampled_from(boundary),
            st.floats(-10, 10, allow_nan=False, width=32 if dtype == np.float32 else 64),
        )
    else:
        element = st.one_of(st.sampled_from([int(b) for b in boundary if abs(b) < 1e6]), st.integers(-10, 10))
    values = draw(st.lists(st.lists(element, min_size=F, max_size=F), min_size=rows, max_size=rows))
    x = np.array(values, dtype=dtype).reshape(rows, F)
    split = draw(st.lists(st.integers(0, rows), max_size=3))
    return x, edges, lo, hi, allow_nan, allow_inf, allowed, sorted(split)


def _make(F, edges, lo, hi, allow_nan, allow_inf, allowed, K=10_000, buffer_rows=1024):
    return Accumulator(
        F,
        lo=[math.nan if b is None else b for b in lo],
        hi=[math.nan if b is None else b for b in hi],
        allow_nan=allow_nan,
        allow_inf=allow_inf,
        allowed=allowed,
        edges=edges,
        max_violations=K,
        buffer_rows=buffer_rows,
    )


def _lohi(lo, hi):
    return [-math.inf if b is None else b for b in lo], [math.inf if b is None else b for b in hi]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernel_matches_numpy_reference(case):
    x, edges, lo, hi, allow_nan, allow_inf, allowed, split = case
    F = x.shape[1]
    acc = _make(F, edges, lo, hi, allow_nan, allow_inf, allowed)
    found = []
    total = 0
    # feed in several batches: Chan's combination across calls must equal one pass
    bounds = [0, *split, x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b < a:
            continue
        r = acc.update(np.ascontiguousarray(x[a:b]))
        if r:
            total += r[0]
            found += [(int(i) + a, int(j), int(c), float(v)) for i, j, c, v in zip(*r[1:])]
    lo_, hi_ = _lohi(lo, hi)
    ref = reference(x, lo_, hi_, allow_nan, allow_inf, allowed, edges)
    got = acc.take()
    for key in ("count", "nan", "inf", "below", "above", "bins"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(got["min"], ref["min"])
    np.testing.assert_array_equal(got["max"], ref["max"])
    # float rounding only: bounded by eps * n * sum|x| (sum) and eps * n * sum x^2 (M2)
    v = x.astype(np.float64)
    finite = np.where(np.isfinite(v), v, 0.0)
    assert np.all(np.abs(got["sum"] - ref["sum"]) <= 1e-12 * np.abs(finite).sum(axis=0) + 1e-300)
    assert np.all(np.abs(got["m2"] - ref["m2"]) <= 1e-9 * (finite**2).sum(axis=0) + 1e-300)
    assert got["rows"] == x.shape[0]
    assert total == len(ref["violations"])
    assert [(i, j, c) for i, j, c, _ in found] == ref["violations"]
    for i, j, _c, value in found:
        expected = float(x[i, j])
        assert (math.isnan(value) and math.isnan(expected)) or value == expected
    # after take(reset=True) the window is empty again
    empty = acc.take()
    assert empty["rows"] == 0 and empty["count"].sum() == 0 and empty["bins"].sum() == 0


def test_first_k_violations_recorded_and_all_counted():
    acc = Accumulator(2, lo=[0, 0], hi=[1, 1], allow_nan=[False, False], allow_inf=[False, False], max_violations=3)
    x = np.full((10, 2), 5.0)
    total, rows, feats, rules, values = acc.update(x)
    assert total == 20
    assert rows.tolist() == [0, 0, 1] and feats.tolist() == [0, 1, 0]
    assert rules.tolist() == [RULE_MAX] * 3 and values.tolist() == [5.0] * 3
    assert acc.violation_counts()[:, RULE_MAX].tolist() == [10, 10]
    assert acc.update(np.zeros((4, 2))) == 0


@pytest.mark.parametrize(
    ("value", "rule", "limit"),
    [
        (math.nan, "allow_nan", "allow_nan=false"),
        (math.inf, "allow_inf", "allow_inf=false"),
        (-5.0, "min", "min=0"),
        (500.0, "max", "max=130"),
        (2.5, "allowed", "allowed={0, 1, 2}"),
        (7.0, "allowed", "allowed={0, 1, 2}"),
    ],
)
def test_each_rule_names_input_row_feature_value(value, rule, limit):
    config = GovernanceConfig.model_validate(
        {
            "inputs": {
                "x": {
                    "feature_names": ["age", "code"],
                    "features": {"age": {"min": 0, "max": 130}, 1: {"allowed": [0, 1, 2]}},
                }
            }
        }
    )
    engine = GovernanceEngine("m", "1", config, ["x"], None, background=False)
    x = np.array([[30.0, 1.0], [40.0, 2.0], [50.0, 0.0]])
    column = 1 if rule == "allowed" else 0
    x[2, column] = value
    inspection = engine.inspect({"x": x}, "req")
    assert inspection.reject and inspection.violation_count == 1
    (v,) = inspection.violations
    assert (v.input, v.row, v.feature, v.rule, v.limit) == ("x", 2, column, rule, limit)
    assert v.feature_name == ("code" if column else "age")
    message = inspection.message()
    assert f"input 'x' row 2 feature '{v.feature_name}' (index {column})" in message and limit in message
    detail = inspection.bad_request()
    assert len(detail.field_violations) == 1 and limit in detail.field_violations[0].description
    assert engine.stats()["violations_by_feature"] == {"x": {v.feature_name: {rule: 1}}}
    engine.close(final_window=False)


def test_flag_mode_serves_and_samples_violations():
    config = GovernanceConfig.model_validate(
        {"mode": "flag", "sampling": {"rate": 0.0}, "inputs": {"x": {"features": {0: {"max": 1}}}}}
    )
    engine = GovernanceEngine("m", "1", config, ["x"], None, background=False)
    inspection = engine.inspect({"x": np.array([[2.0]])}, "req")
    assert not inspection.reject and inspection.sampled and inspection.violation_count == 1
    assert engine.stats()["flagged"] == 1 and engine.stats()["rejected"] == 0
    engine.close(final_window=False)


def test_layouts_last_axis_is_features():
    config = GovernanceConfig.model_validate({"inputs": {"x": {"features": {2: {"max": 1}}}}})
    engine = GovernanceEngine("m", "1", config, ["x", "y"], None, input_shapes={"y": [-1]}, background=False)
    # 1-D of exactly F values: one row
    assert engine.inspect({"x": np.array([0.0, 0.0, 5.0])}, "a").violations[0].row == 0
    # rank 3: rows are all leading axes
    x = np.zeros((2, 2, 3), dtype=np.float32)
    x[1, 0, 2] = 9
    assert engine.inspect({"x": x}, "b").violations[0].row == 2
    # a declared [-1] input is n rows x 1 feature; non-contiguous and other dtypes are handled
    engine.inspect({"y": np.arange(6, dtype=np.int16)[::2]}, "c")
    state = WindowState.from_bytes(engine.snapshot())
    assert state.tensors["y"].rows == 3 and state.tensors["y"].count.tolist() == [3]
    assert state.tensors["x"].rows == 1 + 4
    # a governed input at another width is a violation naming the width: never skipped
    wide = engine.inspect({"x": np.zeros((1, 4))}, "d")
    assert wide.reject and wide.violations[0].rule == "feature_count"
    assert "does not give 3 features per row" in wide.message()
    assert engine.stats()["skipped_tensors"] == 0
    # an input that is only profiled is skipped and counted, never raised
    engine.inspect({"y": np.zeros((2, 2))}, "e")
    assert engine.stats()["skipped_tensors"] == 1
    engine.close(final_window=False)


def test_kernel_rejects_bad_arrays():
    acc = Accumulator(2)
    with pytest.raises(ValueError):
        acc.update(np.zeros((3, 3)))
    with pytest.raises(ValueError):
        acc.update(np.zeros((4, 2))[::2])
    with pytest.raises(TypeError):
        acc.update(np.zeros((1, 2), dtype=np.float16))


# ---------------------------------------------------------------- merge property
def _state(acc: Accumulator, name_features: list[str], k: int = 64) -> TensorState:
    taken = acc.take()
    sketches = SketchSet(acc.n_features, k=k, categorical=[1], classifier=False)
    sketches.feed(acc.drain())
    return TensorState.from_kernel("x", "input", name_features, acc.edge_offsets, taken, sketches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(
        st.lists(
            st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0])),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=80,
    ),
    cuts=st.lists(st.integers(0, 80), max_size=5),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_merged_snapshots_equal_single_stream(data, cuts, dtype):
    x = np.array(data, dtype=dtype)
    edges = [[-10.0, 0.0, 10.0], [0.5, 1.5], [-100.0, 100.0]]
    names = ["a", "b", "c"]

    def acc():
        return Accumulator(3, edges=edges, lo=[-500, math.nan, math.nan], hi=[500, math.nan, math.nan], buffer_rows=256)

    single = acc()
    single.update(x)
    whole = _state(single, names)
    bounds = [0, *sorted(c for c in cuts if c <= len(x)), len(x)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        replica = acc()
        replica.update(np.ascontiguousarray(x[a:b]))
        window = WindowState("m", "1", 0.0, 1.0, {"x": _state(replica, names)})
        parts.append(WindowState.from_bytes(window.to_bytes()))  # through the wire format
    merged = merge_all(parts).tensors["x"]
    for key in ("count", "nan", "inf", "below", "above", "bins", "min", "max"):
        np.testing.assert_array_equal(getattr(merged, key), getattr(whole, key), err_msg=key)
    assert merged.rows == whole.rows
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-7, atol=1e-4)
    assert [s.n for s in merged.sketches.kll] == [s.n for s in whole.sketches.kll]
    assert merged.sketches.frequent[1].total_weight == whole.sketches.frequent[1].total_weight


def test_window_state_rejects_foreign_bytes():
    with pytest.raises(ValueError):
        WindowState.from_bytes(b"not a window")


def test_concurrent_updates_lose_nothing():
    import threading

    acc = Accumulator(16, edges=[[0.0]] * 16, buffer_rows=100)
    x = np.random.default_rng(0).normal(size=(2048, 16))  # 32k values: runs without the GIL
    threads = [threading.Thread(target=lambda: [acc.update(x) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = acc.take()
    assert state["rows"] == 4 * 10 * 2048
    assert state["count"].tolist() == [4 * 10 * 2048] * 16
    assert state["bins"].sum() == 4 * 10 * 2048 * 16
    assert acc.buffered_rows + acc.buffer_dropped == 4 * 10 * 2048  # every row buffered or counted
    np.testing.assert_allclose(state["sum"], 40 * x.sum(axis=0), rtol=1e-9, atol=1e-6)


def test_row_by_row_stream_equals_one_pass():
    """Batch-1 calls gather in the batch scratch and fold every few hundred rows (and on read):
    the moments of 3,000 single-row updates far from zero equal one numpy pass, and a read in
    the middle sees every row so far."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(3000, 4)) * [1.0, 50.0, 1e-3, 7.0] + [1e4, -3.0, 0.5, 0.0]).astype(np.float64)
    x[17, 2] = math.nan
    acc = Accumulator(4, lo=[-math.inf] * 4, hi=[math.inf] * 4, allow_nan=[True] * 4, edges=[[0.0]] * 4, buffer_rows=0)
    for i in range(1000):
        acc.update(x[i : i + 1])
    middle = acc.take(reset=False)
    assert middle["rows"] == 1000 and middle["count"].tolist() == [1000, 1000, 999, 1000]
    for i in range(1000, 3000):
        acc.update(x[i : i + 1])
    got = acc.take()
    finite = np.where(np.isfinite(x), x, np.nan)
    assert got["count"].tolist() == [3000, 3000, 2999, 3000]
    np.testing.assert_array_equal(got["min"], np.nanmin(finite, axis=0))
    np.testing.assert_array_equal(got["max"], np.nanmax(finite, axis=0))
    np.testing.assert_allclose(got["sum"], np.nansum(finite, axis=0), rtol=1e-12)
    m2 = np.nansum((finite - np.nanmean(finite, axis=0)) ** 2, axis=0)
    np.testing.assert_allclose(got["m2"], m2, rtol=1e-9)


@pytest.mark.parametrize("rows_per_call", [1, 3, 64])
def test_bins_equal_searchsorted_at_edges_and_cell_boundaries(rows_per_call):
    """The bin grid's exact cells (no edge inside: the table entry is the bin) and flagged
    cells (scan from the cell's start) must both give ``searchsorted(edges, x, 'right')``,
    for values on, just below and just above every edge and every grid cell boundary."""
    rng = np.random.default_rng(7)
    reference_data = rng.normal(size=20_000) * 3.0 + 1.0
    quantiles = np.quantile(reference_data, np.linspace(0.05, 0.95, 19))
    edge_sets = [
        quantiles,
        np.array([0.0, 0.0, 0.0, 1e-12, 1.0]),  # duplicates and a dense cluster
        np.array([-1e6, -1.0, 1e6]),  # wide span: many edges-free cells
        np.array([2.0]),  # one edge: no grid
        np.array([]),  # no edge: one bin
    ]
    values = [rng.normal(size=400) * 4.0]
    for e in edge_sets:
        if e.size:
            values += [e, np.nextafter(e, -np.inf), np.nextafter(e, np.inf)]
        if e.size >= 2 and e[-1] > e[0]:
            starts = e[0] + np.arange(BIN_GRID_CELLS) * (e[-1] - e[0]) / (BIN_GRID_CELLS - 2)
            values += [starts, np.nextafter(starts, -np.inf), np.nextafter(starts, np.inf)]
    column = np.concatenate(values)
    F = len(edge_sets)
    x = np.ascontiguousarray(np.repeat(column[:, None], F, axis=1))
    acc = Accumulator(F, edges=[list(e) for e in edge_sets], buffer_rows=0)
    for start in range(0, x.shape[0], rows_per_call):
        acc.update(np.ascontiguousarray(x[start:start + rows_per_call]))
    got = acc.take()["bins"]
    offsets = acc.edge_offsets
    for j, e in enumerate(edge_sets):
        expected = np.bincount(np.searchsorted(e, column, side="right"), minlength=e.size + 1)
        np.testing.assert_array_equal(got[offsets[j] + j: offsets[j + 1] + j + 1], expected, err_msg=f"feature {j}")
