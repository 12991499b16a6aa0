"""Plain-text tables for results summaries and benchmarks."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str] | None = None) -> str:
  """Formats dict rows as an aligned text table.

  Args:
    rows: the rows; missing cells print empty.
    columns: column order (default: keys in first-seen order).

  Returns:
    The table, header and a rule line first.

  Example:
    >>> print(format_table([{"a": 1, "b": 0.5}]))
    a  b
    -  ---
    1  0.5
  """
  if columns is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
  cells = [[format_value(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
  return "\n".join(lines)
