"""ortq debug's streamed statistics against the plain numpy formulas they replace.

The statistics were rewritten for speed (in-place float64 buffers, einsum reductions over channel views);
these tests pin them to the straightforward definitions: the quantizer simulation bit for bit, the sums to
float64 rounding, counts and extremes exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortq.tools.debug import MatchedTensor, _Stats


def _matched(scale: np.ndarray, zero_point: np.ndarray, axis: int | None, elem_type: int) -> MatchedTensor:
    return MatchedTensor(name="q", float_name="x", scale=scale, zero_point=zero_point, axis=axis,
                         elem_type=elem_type, constant=False, matched_by="name")


def _plain_sums(values: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.array([np.sum(values)])
    moved = np.moveaxis(values, axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1)


CASES = [
    # shape, per-channel axis of the quantizer (None: per tensor), channel axis of the statistics
    ((3, 5, 7, 6), None, 1),
    ((3, 5, 7, 6), 1, 1),
    ((4, 9, 12), None, 2),
    ((4, 9, 12), 2, 2),
    ((10, 16), 1, 1),
    ((10, 16), None, None),
    ((0, 5, 4, 4), None, 1),
]


@pytest.mark.parametrize("shape,qaxis,axis", CASES)
@pytest.mark.parametrize("elem_type", [onnx.TensorProto.UINT8, onnx.TensorProto.INT8])
def test_streamed_sums_equal_the_plain_formulas(shape: tuple[int, ...], qaxis: int | None, axis: int | None,
                                                elem_type: int) -> None:
    rng = np.random.default_rng(sum(shape) + elem_type)
    channels = shape[qaxis] if qaxis is not None else 1
    lo, hi = (0, 255) if elem_type == onnx.TensorProto.UINT8 else (-128, 127)
    dtype = np.uint8 if elem_type == onnx.TensorProto.UINT8 else np.int8
    # Scales chosen so that some values clip (an outlier channel beyond the range) and some round.
    scale = rng.uniform(0.01, 0.05, channels).astype(np.float32)
    zero_point = rng.integers(lo + 20, hi - 20, channels).astype(dtype)
    m = _matched(scale if qaxis is not None else scale[:1], zero_point if qaxis is not None else zero_point[:1],
                 qaxis, elem_type)
    bshape = [1] * len(shape)
    if qaxis is not None:
        bshape[qaxis] = channels
    s64, z64 = scale.astype(np.float64).reshape(bshape), zero_point.astype(np.float64).reshape(bshape)
    stats, expected = _Stats(), {"signal": 0.0, "noise": 0.0, "inj": 0.0, "dot": 0.0, "asq": 0.0, "clip": 0}
    stats.axis = axis
    maxima = [0.0, 0.0]
    seen = []
    for _ in range(3):  # three batches streamed into one _Stats
        ref = rng.normal(0.0, 1.5, shape).astype(np.float32)
        if ref.size:
            ref.reshape(-1)[:: max(1, ref.size // 7)] *= 40.0  # outliers that clip
        q = np.clip(np.rint(ref.astype(np.float64) / s64) + z64, lo, hi).astype(dtype)
        q.reshape(-1)[::5] = np.clip(q.reshape(-1)[::5].astype(np.int64) + 1, lo, hi)  # upstream noise
        actual = m.dequantize(q)
        fake = m.fake_quantize(ref)
        # the simulation is the same arithmetic as the plain formulas, so bit for bit equal
        assert np.array_equal(actual, (q.astype(np.float64) - z64) * s64)
        assert np.array_equal(fake, (np.clip(np.rint(ref.astype(np.float64) / s64) + z64, lo, hi) - z64) * s64)
        r64 = ref.astype(np.float64)
        err, inj = r64 - actual, r64 - fake
        expected["signal"] = expected["signal"] + _plain_sums(r64 * r64, axis)
        expected["noise"] = expected["noise"] + _plain_sums(err * err, axis)
        expected["inj"] = expected["inj"] + _plain_sums(inj * inj, axis)
        expected["dot"] += float(np.sum(r64 * actual))
        expected["asq"] += float(np.sum(actual * actual))
        bounds = m.clip_bounds(ref.ndim)
        expected["clip"] += int(np.count_nonzero((r64 < bounds[0]) | (r64 > bounds[1])))
        maxima = [max(maxima[0], float(np.max(np.abs(err), initial=0.0))),
                  max(maxima[1], float(np.max(np.abs(inj), initial=0.0)))]
        seen.append(ref)
        stats.update(ref, actual, fake, bounds)
    assert stats.count == 3 * int(np.prod(shape))
    for got, want in ((stats.signal, expected["signal"]), (stats.noise, expected["noise"]),
                      (stats.injected, expected["inj"])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)
    assert stats.dot == pytest.approx(expected["dot"], rel=1e-12, abs=0.0)
    assert stats.actual_sq == pytest.approx(expected["asq"], rel=1e-12, abs=0.0)
    assert (stats.max_error, stats.max_injected) == tuple(maxima)
    assert stats.clipped == expected["clip"]
    if stats.count:
        assert expected["clip"] > 0 and stats.noise.sum() > 0  # the case exercises clipping and noise
        allv = np.concatenate([r.reshape(-1) for r in seen])
        assert (stats.float_min, stats.float_max) == (float(allv.min()), float(allv.max()))
    else:
        assert (stats.float_min, stats.float_max) == (np.inf, -np.inf)


@pytest.mark.parametrize("value", [0.7, -3.2, 1e9, 0.0])
def test_scalar_tensors(value: float) -> None:
    """A 0-d tensor (a scalar weight such as an attention scale, as ONNX Runtime quantizes it) goes through
    the same simulation and sums as any other."""
    m = _matched(np.array(0.02, np.float32), np.array(-3, np.int8), None, onnx.TensorProto.INT8)
    ref = np.array(value, np.float32)
    s, z = np.float64(np.float32(0.02)), -3.0
    fake = m.fake_quantize(ref)
    assert fake.shape == () and fake == (np.clip(np.rint(np.float64(ref) / s) + z, -128, 127) - z) * s
    q = np.array(np.clip(np.rint(np.float64(ref) / s) + z, -128, 127), np.int8)
    actual = m.dequantize(q)
    assert actual.shape == () and actual == (np.float64(q) - z) * s
    stats = _Stats()
    stats.update(ref, actual, fake, m.clip_bounds(0))
    err = np.float64(ref) - actual
    assert stats.signal.tolist() == [np.float64(ref) ** 2] and stats.noise.tolist() == [err * err]
    assert stats.max_error == abs(err) and stats.count == 1
    assert stats.clipped == int(value < (-128 - z - 0.5) * s or value > (127 - z + 0.5) * s)
    assert stats.clipped == int(abs(value) > 2)  # -3.2 and 1e9 lie beyond [-2.51, 2.61]
