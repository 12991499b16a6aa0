"""Low-precision floating-point formats for gradients, simulated exactly.

A format has a sign bit, ``e`` exponent bits and ``m`` mantissa bits
(``1 + e + m <= 8``; codes fit in one byte, 4-bit codes are packed two per
byte on the wire).

* Radix 2 (IEEE-like, every code finite, no inf/NaN): bias
  ``2**(e - 1) - 1``; exponent field ``E = 0`` holds the subnormals
  ``M * 2**(1 - bias - m)``, ``E >= 1`` the normals
  ``(1 + M / 2**m) * 2**(E - bias)``; the largest value is
  ``(2 - 2**-m) * 2**(2**e - 1 - bias)``, and values beyond it saturate.
  ``(4, 3)`` and ``(5, 2)`` give the values and bit patterns of ml_dtypes'
  ``float8_e4m3fn`` and ``float8_e5m2`` wherever those are finite (up to 448
  and 57344: their top codes are NaN/inf, ours saturate).
* Radix 4 with no mantissa (``radix=4, m=0``; Sun et al.'s FP4 is ``(3, 0)``):
  ``E = 0`` is zero, ``E >= 1`` is ``4**(E - 2**e + 1)``, so the levels are
  ``1, 1/4, ..., 4**-(2**e - 2)``.

Rounding: ``"nearest"`` (ties to even for radix 2, to the smaller level for
radix 4) or ``"stochastic"`` (up with probability ``(|y| - lo) / (hi - lo)``
between the two neighbouring levels: unbiased below the largest value).

The functions take ``e`` and ``m`` as Python ints or traced int32 scalars (the
lognormal rule picks them per tensor, inside ``jit``).

References:
  Chmiel et al., "Neural gradients are near-lognormal: improved quantized and
  sparse training", ICLR 2021, https://arxiv.org/abs/2006.08173;
  Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural Networks",
  NeurIPS 2020.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

ROUNDINGS = ("nearest", "stochastic")


def check_format(exponent_bits, mantissa_bits, radix: int, who: str
                 ) -> tuple[int, int]:
  """Validated ``(e, m)``: ints, ``e >= 1``, ``m >= 0``, ``1 + e + m <= 8``."""
  for name, v in (("exponent_bits", exponent_bits),
                  ("mantissa_bits", mantissa_bits)):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      raise ValueError(f"{who}: {name} must be an int, got {v!r}")
  e, m = int(exponent_bits), int(mantissa_bits)
  if e < 1 or m < 0 or 1 + e + m > 8:
    raise ValueError(f"{who}: need exponent_bits >= 1, mantissa_bits >= 0 and "
                     f"1 + exponent_bits + mantissa_bits <= 8, got ({e}, {m})")
  if radix not in (2, 4):
    raise ValueError(f"{who}: radix must be 2 or 4, got {radix!r}")
  if radix == 4 and m:
    raise ValueError(f"{who}: radix-4 formats have no mantissa bits, got "
                     f"mantissa_bits={m}")
  return e, m


def _i32(v):
  return jnp.asarray(v, jnp.int32)


def _bias(e, radix):
  e = _i32(e)
  return (1 << e) - 1 if radix == 4 else (1 << (e - 1)) - 1


def max_value(e, m, radix: int = 2) -> jax.Array:
  """The largest finite value of the format (float32)."""
  e, m = _i32(e), _i32(m)
  if radix == 4:
    return jnp.ones((), jnp.float32)
  top = (1 << e) - 1 - _bias(e, 2)
  return jnp.ldexp(2.0 - jnp.ldexp(jnp.float32(1.0), -m), top).astype(
      jnp.float32)


def _u32(v):
  return jnp.asarray(v, jnp.uint32)


def _f32_bits(exponent):
  """``2.0 ** exponent`` (int32 array, normal float32 range) via its bits."""
  return jax.lax.bitcast_convert_type(
      ((_i32(exponent) + 127) << 23).astype(jnp.uint32), jnp.float32)


def hash_bits(key, shape) -> jax.Array:
  """Uniform uint32 bits per position: a counter-based hash of (position, key).

  The ``lowbias32`` integer hash (C. Wellons) of ``position * golden + seed``
  with the seed folded from the key. It fuses into the quantization pass:
  ``jax.random.bits`` (threefry, or rbg) cost 6-8x an elementwise pass over
  11M floats on CPU here, which is more than the whole quantization. Good
  enough for stochastic rounding (only the low-order uniformity matters);
  not a cryptographic or statistical-quality generator.
  """
  data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  seed = data[0] * _u32(0x85EBCA6B) ^ (data[-1] + _u32(0x9E3779B9))
  size = int(np.prod(shape)) if shape else 1
  x = jnp.arange(size, dtype=jnp.uint32) * _u32(0x9E3779B9) + seed
  x = x ^ (x >> 16)
  x = x * _u32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * _u32(0x846CA68B)
  x = x ^ (x >> 16)
  return x.reshape(shape)


def encode(y: jax.Array, e, m, *, radix: int = 2,
           rounding: str = "nearest", key=None) -> jax.Array:
  """uint8 codes (sign | exponent | mantissa) of ``y`` rounded to the format.

  ``y`` is float32, already scaled; ``e``, ``m`` are ints (radix 2: or
  traced int32 scalars, e.g. a split chosen per tensor). Works on
  the float32 bit pattern (integer adds and shifts, one pass): rounding the
  mantissa to ``m`` bits carries into the exponent by itself; values in the
  format's subnormal band are rounded on their fixed grid; codes saturate at
  the largest value. NaN inputs saturate too (error feedback never sends a
  non-finite gradient: it skips the step).
  """
  y = jnp.asarray(y, jnp.float32)
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
  sign = (bits >> 31).astype(jnp.int32)
  mag = bits & _u32(0x7FFFFFFF)
  a = jax.lax.bitcast_convert_type(mag, jnp.float32)
  rand = hash_bits(key, y.shape) if rounding == "stochastic" else None
  if radix == 2:          # e, m may be traced: integer ops on arrays
    e, m = _i32(e), _i32(m)
    bias = _bias(e, 2)
    emin = 1 - bias
    drop = (23 - m).astype(jnp.uint32)
    low = (_u32(1) << drop) - _u32(1)
    if rand is None:     # nearest, ties to even
      r = mag + (low >> _u32(1)) + ((mag >> drop) & _u32(1))
    else:                # stochastic: add uniform bits below the kept ones
      r = mag + (rand & low)
    normal = (r >> drop).astype(jnp.int32) - ((127 - bias) << m)
    # Exact: a power-of-two scalar (an ldexp of the whole array is slow).
    sub_scaled = a * jnp.ldexp(jnp.float32(1.0), m - emin)
    if rand is None:
      sub = jnp.round(sub_scaled)
    else:
      u = (rand >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
      sub = jnp.floor(sub_scaled + u)
    code = jnp.where(mag >= ((127 + emin) << 23).astype(jnp.uint32), normal,
                     sub.astype(jnp.int32))
    code = jnp.clip(code, 0, (1 << (e + m)) - 1)
  else:                  # radix 4, levels 4**k, k = kmin .. 0
    bias = (1 << e) - 1
    kmin = 1 - bias
    k = jnp.clip(((mag >> 23).astype(jnp.int32) - 127) >> 1, kmin, 0)
    lo = _f32_bits(2 * k)
    tiny = a < np.float32(4.0 ** kmin)
    lo = jnp.where(tiny, 0.0, lo)
    hi = jnp.where(tiny, np.float32(4.0 ** kmin), 4.0 * lo)
    if rand is None:
      up = a - lo > hi - a
    else:
      u = (rand >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
      up = u * (hi - lo) < a - lo
    level = jnp.where(tiny, kmin - 1, k) + up.astype(jnp.int32)
    code = jnp.where(level < kmin, 0, jnp.minimum(level, 0) + bias)
  return (code | (sign << (e + m))).astype(jnp.uint8)


def quantize(y: jax.Array, e: int, m: int, *, radix: int = 2,
             rounding: str = "nearest", key=None) -> jax.Array:
  """``y`` rounded onto the format's grid (float32): ``decode(encode(y))``."""
  return decode(encode(y, e, m, radix=radix, rounding=rounding, key=key), e,
                m, radix=radix)


def decode(code: jax.Array, e, m, *, radix: int = 2) -> jax.Array:
  """float32 values of uint8 codes (the inverse of :func:`encode`)."""
  c = code.astype(jnp.int32)
  e, m = _i32(e), _i32(m)
  field = (c >> m) & ((1 << e) - 1)
  if radix == 2:
    mant = (c & ((1 << m) - 1)).astype(jnp.float32)
    emin = 1 - _bias(e, 2)
    value = jnp.where(field == 0, jnp.ldexp(mant, emin - m),
                      jnp.ldexp(mant + jnp.ldexp(1.0, m),
                                field - _bias(e, 2) - m))
  else:
    value = jnp.where(field == 0, 0.0,
                      jnp.ldexp(jnp.float32(1.0), 2 * (field - _bias(e, 4))))
  negative = ((c >> (e + m)) & 1) == 1
  return jnp.where(negative, -value, value).astype(jnp.float32)


def pack4(codes: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte (the last one padded with 0)."""
  if codes.shape[-1] % 2:
    codes = jnp.concatenate(
        [codes, jnp.zeros(codes.shape[:-1] + (1,), codes.dtype)], -1)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: jax.Array) -> jax.Array:
  """The inverse of :func:`pack4` (an even number of codes)."""
  low, high = packed & 0xF, packed >> 4
  return jnp.stack([low, high], -1).reshape(packed.shape[:-1] + (-1,))


# ------------------------------------------------ lognormal format choice --


def expected_relative_mse(mu, sigma, e, m, log_scale) -> jax.Array:
  """Expected squared RELATIVE rounding error ``E[((Q(x) - x) / x)^2]``.

  ``|x|`` is lognormal, ``ln|x| ~ N(mu, sigma^2)``, and the radix-2 format
  (nearest rounding) sees ``|x| / s`` with ``ln s = log_scale``. A value in
  a band of grid spacing ``h`` gets the uniform-rounding error ``h^2 / 12``
  (so relative ``h^2 / (12 x^2)``, integrated in closed form over each
  binade and the subnormal band); a value below half the smallest subnormal
  becomes 0 (relative error 1); nothing overflows (the scale maps the
  tensor's max onto the format's max). Relative, not absolute: the absolute
  MSE of a wide lognormal is dominated by the few largest entries and always
  prefers fixed point (``e = 1``); relative error is what makes wide
  distributions want exponent bits, the paper's finding. ``e``, ``m`` and
  ``log_scale`` may be arrays of candidate formats (broadcastable); the
  result has their shape.
  """
  mu = jnp.asarray(mu, jnp.float32)
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)
  e, m = _i32(e), _i32(m)
  emin = 1 - _bias(e, 2)
  kmax = (1 << e) - 1 - _bias(e, 2)
  ln2 = np.float32(np.log(2.0))
  c = mu - log_scale                 # ln(|x| / s) ~ N(c, sigma^2)
  s2 = sigma * sigma

  def band(lo, hi, ln_h, c):
    """E[h^2 / (12 x^2); lo <= ln x < hi] with x = |x| / s."""
    # E[exp(-2Y); lo <= Y < hi] = exp(-2c + 2 s2) * (Phi(b') - Phi(a')),
    # a' = (lo - c + 2 s2) / sigma (the lognormal's -2 moment, truncated).
    mass = (ndtr((hi - c + 2.0 * s2) / sigma)
            - ndtr((lo - c + 2.0 * s2) / sigma))
    log_term = (2.0 * ln_h - 2.0 * c + 2.0 * s2
                + jnp.log(jnp.maximum(mass, 1e-37)))
    return jnp.where(mass > 0, jnp.exp(jnp.minimum(log_term, 80.0)), 0.0) / 12.0

  # Every binade of every format with e <= 7, on a trailing axis (so a whole
  # array of candidate formats is one computation).
  ks = jnp.arange(-130, 130, dtype=jnp.int32)
  live = (ks >= emin[..., None]) & (ks <= kmax[..., None])
  kf = ks.astype(jnp.float32)
  err = jnp.sum(jnp.where(live, band(kf * ln2, (kf + 1) * ln2,
                                     (kf - m[..., None]) * ln2,
                                     jnp.expand_dims(c, -1)), 0.0), axis=-1)
  t = (emin - m - 1).astype(jnp.float32) * ln2    # half the smallest step
  err = err + band(t, emin.astype(jnp.float32) * ln2,
                   (emin - m).astype(jnp.float32) * ln2, c)
  return err + ndtr((t - c) / sigma)               # underflow: error 1


def choose_split(mu, sigma, log_amax, bits: int) -> tuple[jax.Array, jax.Array]:
  """``(e, m)`` of ``bits``-bit radix-2 formats minimising :func:`expected_relative_mse`.

  The scale maps ``exp(log_amax)`` (the tensor's max) to each format's max.
  Candidates: every ``e`` from 1 to ``bits - 1`` (``m = bits - 1 - e``),
  evaluated as one batch.
  """
  es = np.arange(1, bits, dtype=np.int32)
  ms = bits - 1 - es
  log_scale = log_amax - jnp.log(max_value(es, ms))
  e = jnp.asarray(es)[jnp.argmin(expected_relative_mse(mu, sigma, es, ms,
                                                       log_scale))]
  return e, bits - 1 - e


def describe(e, m, radix: int = 2) -> str:
  """A short name: ``"e4m3"``, ``"fp4-radix4(e3)"``."""
  return f"fp{1 + e + m}-radix4(e{e})" if radix == 4 else f"e{e}m{m}"

