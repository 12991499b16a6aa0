"""Writes ``docs/API.md``: one line (signature + summary) per public name.

Run from the repository root after changing the public API::

    python tools/api_reference.py            # rewrites docs/API.md
    python tools/api_reference.py --check    # exits 1 if docs/API.md is stale

The public names are the ``__all__`` of ``sparse_jax`` and of its subpackages
(``sj.masks``, ``sj.sparsity``, ``sj.compression``, ``sj.bayes``, ``sj.data``,
``sj.models``, ``sj.training``). Each is listed with its signature (without type
annotations) and the first line of its docstring, grouped by the module that
defines it. A constant's summary is its attribute docstring: the string literal
right after the assignment, ``NAME = ...`` then ``\"\"\"Summary.\"\"\"``.
``tests/test_api_docs.py`` checks that the committed file equals the output.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import sys
import types
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "API.md")
COMMAND = "python tools/api_reference.py"

# (module, short name, what the family is for), in the order of the reference.
PACKAGES = (
    ("sparse_jax", "sj", "the curated entry points"),
    ("sparse_jax.masks", "sj.masks", "pure mask functions"),
    ("sparse_jax.sparsity", "sj.sparsity", "N:M training transforms"),
    ("sparse_jax.compression", "sj.compression",
     "gradient compression and error feedback"),
    ("sparse_jax.bayes", "sj.bayes", "FOO-VB and Bayesian prediction"),
    ("sparse_jax.data", "sj.data", "datasets"),
    ("sparse_jax.models", "sj.models", "Flax NNX models"),
    ("sparse_jax.training", "sj.training", "training plumbing"),
)
# Defining modules listed first inside their package (the rest follow in the
# order the package's __init__ imports them).
FIRST = ("sparse_jax.sparsity.projection", "sparse_jax.sparsity.ste",
         "sparse_jax.compression.compressors",
         "sparse_jax.compression.error_feedback", "sparse_jax.bayes.transform")


class Entry(NamedTuple):
  """One public name: where it is defined, how it is called, its summary."""
  name: str
  module: str
  signature: str
  summary: str | None


def public_names(package: str) -> list[str]:
  """The ``__all__`` of ``package`` (an error if it has none)."""
  module = importlib.import_module(package)
  names = getattr(module, "__all__", None)
  if names is None:
    raise ValueError(f"{package} has no __all__")
  return list(names)


def is_constant(obj: Any) -> bool:
  """A public name that is data (a tuple, dict, ...): no docstring of its own."""
  return not (callable(obj) or isinstance(obj, types.ModuleType))


def attribute_docstring(module_name: str, name: str) -> str | None:
  """The string literal right after ``name = ...`` at the top of a module."""
  module = importlib.import_module(module_name)
  try:
    source = inspect.getsource(module)
  except (OSError, TypeError):
    return None
  body = ast.parse(source).body
  for stmt, after in zip(body, body[1:]):
    if isinstance(stmt, ast.Assign):
      targets = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
      targets = [stmt.target.id]
    else:
      continue
    if (name in targets and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)):
      return inspect.cleandoc(after.value.value)
  return None


def constant_module(package: str, name: str, obj: Any) -> str:
  """The module that assigns the constant ``name`` re-exported by ``package``."""
  pkg = importlib.import_module(package)
  candidates = [package] + sorted(
      m for m in sys.modules if m.startswith(package + ".")
      and m.count(".") == package.count(".") + 1)
  for module_name in candidates:
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    if getattr(module, name, None) is not obj:
      continue
    try:
      tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
      continue
    for stmt in tree.body:
      targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                 [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
      if any(isinstance(t, ast.Name) and t.id == name for t in targets):
        return module_name
  return pkg.__name__


def docstring(obj: Any) -> str | None:
  """The object's OWN docstring (not one inherited from a base class)."""
  if isinstance(obj, type):
    doc = vars(obj).get("__doc__")
    fields = getattr(obj, "_fields", None)
    if doc and fields is not None and doc.startswith(f"{obj.__name__}("):
      return None  # the NamedTuple's generated "Name(a, b)"
    return inspect.cleandoc(doc) if doc else None
  return inspect.getdoc(obj)


def summary_line(doc: str | None) -> str | None:
  """The first line of a docstring, or None when there is none."""
  if not doc or not doc.strip():
    return None
  return doc.strip().splitlines()[0].strip()


def signature(name: str, obj: Any) -> str:
  """``name(args)`` without annotations; ``name`` alone for modules/constants."""
  if isinstance(obj, types.ModuleType) or is_constant(obj):
    return name
  try:
    sig = inspect.signature(obj)
    kinds = {p.kind for p in sig.parameters.values()}
    if isinstance(obj, type) and kinds <= {inspect.Parameter.VAR_POSITIONAL,
                                           inspect.Parameter.VAR_KEYWORD}:
      # e.g. nnx.Module subclasses (their metaclass hides __init__)
      init = inspect.signature(obj.__init__)
      sig = init.replace(parameters=list(init.parameters.values())[1:])
  except (TypeError, ValueError):
    return f"{name}(...)"
  params = [p.replace(annotation=inspect.Parameter.empty)
            for p in sig.parameters.values()]
  text = str(sig.replace(parameters=params,
                         return_annotation=inspect.Signature.empty))
  return name + re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def entry(package: str, name: str) -> Entry:
  """The reference entry of ``package.name``."""
  obj = getattr(importlib.import_module(package), name)
  if isinstance(obj, types.ModuleType):
    module = package
    summary = summary_line(inspect.getdoc(obj))
  elif is_constant(obj):
    module = constant_module(package, name, obj)
    summary = summary_line(attribute_docstring(module, name))
  else:
    module = getattr(obj, "__module__", package) or package
    summary = summary_line(docstring(obj))
  return Entry(name, module, signature(name, obj), summary)


def entries(package: str) -> list[Entry]:
  """Every public name of ``package``, in ``__all__`` order."""
  return [entry(package, name) for name in public_names(package)]


def _markdown(text: str) -> str:
  """Sphinx roles (``:func:`~a.b```) as plain Markdown code."""
  return re.sub(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`",
                lambda m: f"`{m.group(1)}`", text)


def _import_order(package: str) -> list[str]:
  """Submodules in the order ``package/__init__.py`` imports from them."""
  source = inspect.getsource(importlib.import_module(package))
  order = []
  for stmt in ast.parse(source).body:
    if isinstance(stmt, ast.ImportFrom) and stmt.module:
      if stmt.module.startswith(package + ".") and stmt.module not in order:
        order.append(stmt.module)
  return order


def _group(package: str, items: list[Entry]) -> list[tuple[str, list[Entry]]]:
  """Entries grouped by defining module: FIRST modules, then import order."""
  order = list(_import_order(package))
  rank = {m: i for i, m in enumerate(
      [m for m in FIRST if m in order] + [package]
      + [m for m in order if m not in FIRST])}
  groups: dict[str, list[Entry]] = {}
  for item in items:
    # Group by the submodule of the package the name comes from.
    parts = item.module.split(".")
    depth = package.count(".") + 2
    groups.setdefault(".".join(parts[:depth]), []).append(item)
  return sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)),
                                                kv[0]))


def _line(prefix: str, item: Entry) -> str:
  summary = _markdown(item.summary) if item.summary else "(no docstring)"
  return f"- `{prefix}{item.signature}`: {summary}"


def render() -> str:
  """The whole reference as Markdown."""
  out = [
      "# sparse_jax API reference",
      "",
      f"Generated by `{COMMAND}` from the package's docstrings and signatures"
      " (do not edit by hand; `tests/test_api_docs.py` checks it is current).",
      "One line per public name: the call signature (type annotations left out)"
      " and the first line of its docstring; `help(name)` shows the rest (Args,"
      " Returns, an Example, References). `import sparse_jax as sj`.",
      "",
  ]
  for package, short, what in PACKAGES:
    anchor = short.replace(".", "")
    out.append(f"- [`{short}`](#{anchor}): {what}")
  out.append("")
  for package, short, what in PACKAGES:
    module = importlib.import_module(package)
    out += [f"## {short}", "", _markdown(summary_line(inspect.getdoc(module)) or ""),
            ""]
    items = entries(package)
    if package == "sparse_jax":  # the entry points, then the subpackages
      modules = [i for i in items if i.signature == i.name and i.module == package
                 and isinstance(getattr(module, i.name), types.ModuleType)]
      for item in [i for i in items if i not in modules] + modules:
        out.append(_line("sj.", item))
      out.append("")
      continue
    for module_name, group in _group(package, items):
      sub = importlib.import_module(module_name)
      title = summary_line(inspect.getdoc(sub)) if module_name != package else None
      heading = f"### `{module_name}`"
      out += [heading, ""]
      if title:
        out += [_markdown(title), ""]
      for item in group:
        out.append(_line(short + ".", item))
      out.append("")
  return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if the file differs from what would be written")
  parser.add_argument("--out", default=OUTPUT, help="output file (docs/API.md)")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    try:
      with open(args.out, encoding="utf-8") as f:
        current = f.read()
    except FileNotFoundError:
      current = None
    if current != text:
      print(f"{args.out} is stale: run `{COMMAND}`", file=sys.stderr)
      return 1
    print(f"{args.out} is up to date")
    return 0
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
