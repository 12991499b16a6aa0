"""Bytes on the wire: analytic per-device counts, and the same read from HLO.

Per device and per step, for ``n`` workers:

* compressed exchange of a tensor whose compressed form takes ``B`` bytes
  (values + indices): a ring all-gather, in which every device forwards
  ``n - 1`` chunks, so it sends and receives ``(n - 1) * B`` bytes;
* a dense low-precision message (fixed layout): a reduce-scatter (an
  all-to-all of its ``n`` chunk messages of ``B_c`` bytes each) then an
  all-gather of the re-encoded mean chunks, ``2 (n - 1) B_c``;
* a tensor where neither saves bytes (e.g. N:M 2:4 at 8 workers): each worker
  decompresses and it is all-reduced densely;
* a dense tensor of ``D`` bytes with a ring all-reduce (reduce-scatter then
  all-gather): ``2 (n - 1) / n * D`` sent and as many received.

``dense`` is always the ring all-reduce of ALL the gradients, the reference a
compressed exchange has to beat. Sparse wins only when ``B < 2 D / n``: for
top-k with fp32 values and int32 indices, when ``k < d / n``.

:func:`hlo_collectives` reads the collectives out of a compiled step
(``jitted.lower(...).compile().as_text()``), so the analytic figure can be
checked against what XLA will actually run.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from sparse_jax._core import trees


class WireBytes(NamedTuple):
  """Bytes one device moves in one step (float32 scalars inside a state)."""
  sent: Any       # compressed exchange (+ dense all-reduce of excluded leaves)
  received: Any   # same, received
  dense: Any      # a dense ring all-reduce of all the gradients, each way


def ring_all_reduce_bytes(nbytes: float, num_workers: int) -> float:
  """Bytes each device sends (= receives) in a ring all-reduce of ``nbytes``."""
  return 2.0 * (num_workers - 1) / num_workers * nbytes


def all_gather_bytes(nbytes: float, num_workers: int) -> float:
  """Bytes each device receives (= forwards) in a ring all-gather of ``nbytes`` each."""
  return float((num_workers - 1) * nbytes)


def _leaf_nbytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def exchange_plan(compressor, params, *, num_workers: int, mask=None,
                  collective: str = "auto") -> list[tuple[str, str, float]]:
  """How each leaf is exchanged: ``[(path, collective, bytes), ...]``.

  The same choice :func:`~sparse_jax.compression.error_feedback` makes
  (``collective="auto"``: the cheapest of all-gather, all-reduce and, for
  dense low-precision formats, reduce-scatter; see
  :func:`sparse_jax.compression.exchange.route`). Leaves excluded by ``mask``
  are ``"dense"`` (a ring all-reduce).

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.compression import fp_quantize, top_k
    >>> p = {"w": jnp.zeros((1000, 1000))}
    >>> exchange_plan(top_k(0.001), p, num_workers=8)
    [("['w']", 'all_gather', 56000.0)]
    >>> exchange_plan(fp_quantize(4, 3), p, num_workers=8)[0][1]
    'reduce_scatter'
  """
  from sparse_jax.compression import exchange  # pylint: disable=g-import-not-at-top
  n = int(num_workers)
  flags = trees.select(mask, params, who="exchange_bytes")
  rows = []
  for (path, leaf), flag in zip(trees.flatten(params)[0], flags):
    if trees.is_masked(leaf):
      continue
    where = trees.path_str(path)
    if flag and math.prod(leaf.shape) > 0:
      rt = exchange.route(compressor, leaf.shape, leaf.dtype, n, collective)
      rows.append((where, rt.collective, rt.nbytes))
    else:
      rows.append((where, "dense", ring_all_reduce_bytes(_leaf_nbytes(leaf),
                                                         n)))
  return rows


def exchange_bytes(compressor, params, *, num_workers: int,
                   mask=None, collective: str = "auto") -> WireBytes:
  """Analytic bytes per device and step of the error-feedback exchange.

  Args:
    compressor: a :class:`~sparse_jax.compression.Compressor`.
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (the gradient
      shapes).
    num_workers: ``n``, the size of the data axis.
    mask: the same mask given to ``error_feedback`` (pytree of bools, a
      prefix of one, or a callable ``params -> pytree of bools``); ``None``
      compresses every leaf.
    collective: as ``error_feedback(collective=...)``; which one each leaf
      uses is :func:`exchange_plan`.

  Returns:
    A :class:`WireBytes` of Python floats.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.compression import top_k
    >>> w = exchange_bytes(top_k(0.001), {"w": jnp.zeros((1000, 1000))},
    ...                    num_workers=8)
    >>> w.received, w.dense     # 7 * 1000 * 8 bytes vs 2 * 7/8 * 4e6
    (56000.0, 7000000.0)
  """
  n = int(num_workers)
  plan = exchange_plan(compressor, params, num_workers=n, mask=mask,
                       collective=collective)
  sent = float(sum(nbytes for _, _, nbytes in plan))
  dense = float(sum(ring_all_reduce_bytes(_leaf_nbytes(x), n)
                    for x in trees.leaves(params) if not trees.is_masked(x)))
  return WireBytes(sent, sent, dense)


# ------------------------------------------------------------------ HLO --


class Collective(NamedTuple):
  """One collective op found in HLO text."""
  kind: str                 # "all-gather", "all-reduce", "reduce-scatter", ...
  shapes: tuple             # ((dtype, dims), ...) of its result
  group_size: int           # devices per replica group
  result_bytes: int         # bytes of the result (summed over tuple parts)

  @property
  def bytes_per_device(self) -> float:
    """Bytes each device receives for this op with a ring algorithm."""
    n = self.group_size
    if self.kind == "all-gather":
      return (n - 1) / n * self.result_bytes
    if self.kind == "all-reduce":
      return ring_all_reduce_bytes(self.result_bytes, n)
    if self.kind == "reduce-scatter":
      return (n - 1) * self.result_bytes
    if self.kind == "all-to-all":
      return (n - 1) / n * self.result_bytes
    return float(self.result_bytes)   # collective-permute and the like


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
          "collective-permute")
_OP_RE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>" + "|".join(_KINDS) + r")(?P<start>-start)?\(")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_ARRAY_RE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[([0-9]+),([0-9]+)\]")


def hlo_collectives(hlo_text: str, *, num_devices: int | None = None
                    ) -> list[Collective]:
  """Finds the collective ops of an HLO module and the shapes they produce.

  Args:
    hlo_text: e.g. ``jitted.lower(*args).compile().as_text()``.
    num_devices: group size used when an op lists no replica groups.

  Returns:
    One :class:`Collective` per op (``-done`` halves of async pairs skipped).
  """
  out = []
  for line in hlo_text.splitlines():
    line = _COMMENT_RE.sub("", line)    # e.g. /*index=5*/ inside tuples
    match = _OP_RE.search(line)
    if not match:
      continue
    shapes = tuple((dt, tuple(int(s) for s in dims.split(",") if s))
                   for dt, dims in _ARRAY_RE.findall(match["shape"]))
    kind = match["kind"]
    if match["start"] and kind == "all-gather" and len(shapes) % 2 == 0:
      shapes = shapes[len(shapes) // 2:]  # (operands..., results...)
    groups = _GROUPS_LIST_RE.search(line)
    if groups:
      group_size = len([g for g in groups.group(1).split(",") if g])
    else:
      iota = _GROUPS_IOTA_RE.search(line)
      group_size = int(iota.group(2)) if iota else int(num_devices or 1)
    nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims)
                 for dt, dims in shapes)
    out.append(Collective(kind, shapes, group_size, nbytes))
  return out


def hlo_wire_bytes(hlo_text: str, *, num_devices: int | None = None,
                   min_bytes: int = 0) -> dict[str, float]:
  """Bytes each device receives per call, by collective kind, from HLO.

  Args:
    hlo_text: compiled HLO text.
    num_devices: group size when an op lists no replica groups.
    min_bytes: ignore ops whose result is smaller (e.g. scalar metrics).

  Returns:
    ``{kind: bytes}`` summed over the ops of each kind.
  """
  totals: dict[str, float] = {}
  for op in hlo_collectives(hlo_text, num_devices=num_devices):
    if op.result_bytes < min_bytes:
      continue
    totals[op.kind] = totals.get(op.kind, 0.0) + op.bytes_per_device
  return totals

