"""Low-precision gradient formats: exact rounding, codes, bytes, format choice."""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sparse_jax.compression as C
from sparse_jax.compression import formats as F


def grid(e, m, radix=2):
  """Every code of the format and its value, by enumeration."""
  codes = np.arange(1 << (1 + e + m), dtype=np.uint8)
  return codes, np.asarray(F.decode(jnp.asarray(codes), e, m, radix=radix))


def spread(n, seed=0, lo=-30.0, hi=10.0):
  rng = np.random.default_rng(seed)
  x = rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(lo, hi, n))
  return x.astype(np.float32)


@pytest.mark.parametrize("e,m,dtype,top", [
    (4, 3, ml_dtypes.float8_e4m3fn, 448.0),
    (5, 2, ml_dtypes.float8_e5m2, 57344.0)])
def test_bit_exact_against_ml_dtypes(e, m, dtype, top):
  x = np.concatenate([spread(200_000), np.float32([
      0.0, -0.0, top, -top, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 1e-40,
      -2.0 ** -17, 2.0 ** -16, 1.0625, 1.1875, 0.5 + 2.0 ** -5])])
  x = np.clip(x, -top, top)        # beyond: theirs is NaN/inf, ours saturates
  ref = x.astype(dtype)
  codes = np.asarray(F.encode(jnp.asarray(x), e, m))
  np.testing.assert_array_equal(codes, ref.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(F.decode(jnp.asarray(codes), e, m)),
                                ref.astype(np.float32))


@pytest.mark.parametrize("e,m,radix", [(1, 2, 2), (2, 1, 2), (3, 2, 2),
                                       (1, 6, 2), (5, 2, 2), (2, 0, 2),
                                       (3, 0, 4), (2, 0, 4)])
def test_nearest_is_the_brute_force_nearest_grid_value(e, m, radix):
  codes, values = grid(e, m, radix)
  positive = np.unique(values[values >= 0])
  # Round trip: every value encodes to a code of the same value.
  back = np.asarray(F.decode(F.encode(jnp.asarray(values), e, m, radix=radix),
                             e, m, radix=radix))
  np.testing.assert_array_equal(back, values)
  top = positive.max()
  x = np.concatenate([spread(20_000, 1, -14, 4), positive, -positive,
                      (positive[1:] + positive[:-1]) / 2])   # exact ties
  q = np.asarray(F.quantize(jnp.asarray(x), e, m, radix=radix))
  a = np.minimum(np.abs(x), top)
  dist = np.abs(a[:, None] - positive[None, :])
  best = dist.min(1)
  np.testing.assert_allclose(np.abs(np.abs(q) - a), best, rtol=0, atol=0)
  assert np.all(np.isin(np.abs(q), positive))
  if radix == 2:   # ties to the even mantissa (the even code)
    tie = np.isclose(dist, best[:, None], rtol=0, atol=0).sum(1) == 2
    tq = np.asarray(F.encode(jnp.asarray(np.abs(x[tie])), e, m))
    assert np.all(tq % 2 == 0)


@pytest.mark.parametrize("e,m,radix,x", [(4, 3, 2, 0.3), (2, 1, 2, 0.003),
                                         (3, 0, 4, 0.3), (3, 0, 4, 1e-5)])
def test_stochastic_rounding_is_unbiased_between_neighbours(e, m, radix, x):
  _, values = grid(e, m, radix)
  positive = np.unique(values[values >= 0])
  lo, hi = positive[positive <= x].max(), positive[positive >= x].min()
  y = jnp.full((400_000,), x, jnp.float32)
  q = np.asarray(F.quantize(y, e, m, radix=radix, rounding="stochastic",
                            key=jax.random.key(3)))
  assert set(np.unique(q)) <= {lo, hi}
  p = (x - lo) / (hi - lo)
  assert abs(np.mean(q == hi) - p) < 5 * math.sqrt(p * (1 - p) / q.size) + 1e-6
  other = np.asarray(F.quantize(y, e, m, radix=radix, rounding="stochastic",
                                key=jax.random.key(4)))
  assert np.mean(other != q) > 0.5 * 2 * p * (1 - p)   # another key, other draws


def test_fp_quantize_scales_per_tensor_and_sends_bytes():
  x = jnp.asarray(spread(1001, 2, -8, 3))
  for comp, nbytes, rel in [(C.fp_quantize(4, 3), 1001 + 4, 2.0 ** -4),
                            (C.fp_quantize(5, 2), 1001 + 4, 2.0 ** -3),
                            (C.fp4(rounding="nearest"), 501 + 4, 0.6)]:
    out = comp.compress(x, jax.random.key(0))
    assert out.values.dtype == jnp.uint8 and comp.fixed_layout
    assert comp.wire_bytes(x.shape) == nbytes
    dense = comp.decompress(out, x.shape)
    assert float(jnp.max(jnp.abs(dense))) == pytest.approx(
        float(jnp.max(jnp.abs(x))), rel=1e-6)      # the max is exact
    big = jnp.abs(x) > 1e-2 * jnp.max(jnp.abs(x))    # normal range
    err = jnp.abs(dense - x) / jnp.abs(x)
    assert float(jnp.max(jnp.where(big, err, 0.0))) <= rel + 1e-6
  fixed = C.fp_quantize(4, 3, scale=0.5)
  out = fixed.compress(jnp.asarray([0.1, 1.0]), jax.random.key(0))
  assert out.scale is None and fixed.wire_bytes((2,)) == 2
  np.testing.assert_allclose(fixed.decompress(out, (2,)), [0.1015625, 1.0])


def test_compose_sends_kept_values_in_fp8():
  x = jnp.asarray(spread(10_000, 3, -5, 2))
  comp = C.compose(C.top_k(0.01), C.fp_quantize(4, 3))
  assert comp.wire_bytes(x.shape) == 100 * (1 + 4) + 4
  dense = comp.decompress(comp.compress(x, jax.random.key(0)), x.shape)
  exact = C.top_k(0.01).decompress(C.top_k(0.01).compress(x, None), x.shape)
  np.testing.assert_array_equal(np.asarray(dense) != 0, np.asarray(exact) != 0)
  np.testing.assert_allclose(dense, exact, rtol=2.0 ** -4)
  with pytest.raises(ValueError, match="compose: expects"):
    C.compose(C.fp_quantize(4, 3), C.top_k(0.1))


@pytest.mark.parametrize("bits", [8, 4])
def test_lognormal_fp_picks_the_empirically_best_split(bits):
  comp = C.lognormal_fp(bits)
  chosen = []
  for sigma in (0.5, 1.0, 2.0, 3.0):
    rng = np.random.default_rng(int(sigma * 10))
    g = jnp.asarray(rng.choice([-1.0, 1.0], 100_000) * np.exp(
        sigma * rng.normal(size=100_000) - 7.0), jnp.float32)
    out = comp.compress(g, jax.random.key(0))
    e = int(out.scale[1])
    errors = []
    for width in range(1, bits):
      q = C.fp_quantize(width, bits - 1 - width)
      d = q.decompress(q.compress(g, None), g.shape)
      errors.append(float(jnp.mean(jnp.square((d - g) / g))))
    assert e == 1 + int(np.argmin(errors)), (sigma, e, errors)
    fixed = C.fp_quantize(e, bits - 1 - e)
    same = np.isclose(comp.decompress(out, g.shape), fixed.decompress(
        fixed.compress(g, None), g.shape), rtol=1e-6, atol=0)
    assert same.mean() > 0.9999     # (the scales may differ by an ulp)
    chosen.append(e)
  assert chosen == sorted(chosen)      # wider distributions: more exponent
  assert comp.wire_bytes((100,)) == (100 if bits == 8 else 50) + 8


def test_error_feedback_with_fp_formats_loses_nothing():
  """EF14's invariant holds with a quantizer: what rounding drops is in e."""
  n, d, steps, lr = 3, 64, 20, 0.05
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(n, d, d)) / 8, jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  for comp in (C.fp4(), C.lognormal_fp(4), C.compose(C.top_k(0.1),
                                                     C.fp_quantize(4, 3))):
    tx = C.error_feedback(comp, learning_rate=lr)
    x = {"w": jnp.zeros(d)}
    states = [tx.init(x) for _ in range(n)]
    total = jnp.zeros(d)
    for _ in range(steps):
      ups = []
      for i in range(n):
        g = {"w": a[i].T @ (a[i] @ x["w"] - b[i])}
        total = total + lr * g["w"]
        u, states[i] = tx.update(g, states[i], x)
        ups.append(u["w"])
      x = {"w": x["w"] + sum(ups) / n}
    lhs = -n * x["w"] + sum(s.local.memory["w"] for s in states)
    np.testing.assert_allclose(lhs, total, rtol=1e-4, atol=1e-5)


def test_format_errors_name_the_argument():
  with pytest.raises(ValueError, match="1 \\+ exponent_bits"):
    C.fp_quantize(5, 3)
  with pytest.raises(ValueError, match="exponent_bits must be an int"):
    C.fp_quantize(True, 3)
  with pytest.raises(ValueError, match="radix-4 formats have no mantissa"):
    C.fp_quantize(3, 1, radix=4)
  with pytest.raises(ValueError, match="rounding must be one of"):
    C.fp_quantize(4, 3, rounding="up")
  with pytest.raises(ValueError, match="scale must be"):
    C.fp_quantize(4, 3, scale=0.0)
  with pytest.raises(ValueError, match="bits must be an int in"):
    C.lognormal_fp(9)
  assert list(itertools.islice(F.ROUNDINGS, 2)) == ["nearest", "stochastic"]


@pytest.mark.parametrize("size", [10, 13, 1001])
@pytest.mark.parametrize("make", [C.fp4, lambda: C.fp_quantize(4, 3),
                                  lambda: C.lognormal_fp(4)])
def test_chunked_messages_decode_in_place(size, make):
  """A reduce-scatter message: one message per chunk, rows trimmed on decode.

  (Rows of packed 4-bit codes of odd length carry a padding code; decoding
  them without trimming shifted every later chunk: EF with FP4 diverged.)
  """
  from sparse_jax.compression import exchange
  comp = make()
  x = jnp.asarray(spread(size, 4, -6, 2))
  ch = exchange.chunked(comp, 8, size)
  got = ch.decompress(ch.compress(x, jax.random.key(1)), (size,))
  chunk = -(-size // 8)
  rows = jnp.pad(x, (0, 8 * chunk - size)).reshape(8, chunk)
  keys = jax.random.split(jax.random.key(1), 8)
  want = jnp.concatenate([comp.decompress(comp.compress(r, k), (chunk,))
                          for r, k in zip(rows, keys)])[:size]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
