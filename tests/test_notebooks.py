"""Executes notebooks/*.ipynb (small settings) and checks what they print.

Each notebook runs in a fresh ipykernel of THIS Python (a kernelspec written
for ``sys.executable``), in a temporary directory, with
``SPARSE_JAX_NOTEBOOK_SMOKE=1`` (small settings) and ``OPENBLAS_NUM_THREADS=1``.
The last cell of each notebook prints ``SUMMARY {json}``.
"""

import json
import os
import sys
import time

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A python3 kernelspec for this interpreter and the kernel's environment."""
  from ipykernel.kernelspec import write_kernel_spec

  jupyter_path = tmp_path / "jupyter"
  write_kernel_spec(str(jupyter_path / "kernels" / "python3"))
  monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
  monkeypatch.setenv("SPARSE_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend
  # The kernel imports the sparse_jax of this checkout.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  spec = KernelSpecManager().get_kernel_spec("python3")
  assert spec.argv[0] == sys.executable, spec.argv
  workdir = tmp_path / "run"
  workdir.mkdir()
  return workdir


def _execute(name: str, workdir) -> tuple[dict, float, object]:
  path = os.path.join(NOTEBOOKS, name)
  nb = nbformat.read(path, as_version=4)
  # Stored without outputs (clean diffs); the builder script writes them so.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(workdir)}})
  t0 = time.perf_counter()
  client.execute()
  wall = time.perf_counter() - t0
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs
                 if o.output_type == "stream")
  lines = [l for l in text.splitlines() if l.startswith("SUMMARY ")]
  assert len(lines) == 1, text
  return json.loads(lines[0][len("SUMMARY "):]), wall, nb


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells
             if c.cell_type == "code" for o in c.outputs)


def test_quickstart_notebook(kernel_env):
  summary, wall, nb = _execute("quickstart.ipynb", kernel_env)
  print(f"quickstart.ipynb (smoke) executed in {wall:.1f} s")
  assert summary["smoke"] is True
  # Both recipes learn (chance is 0.1).
  assert summary["accuracy_ef_sgd_nm"] > 0.4
  assert summary["accuracy_foovb_tnm_mean"] > 0.4
  assert summary["accuracy_foovb_tnm_bma"] > 0.4
  # The masks are what each recipe promises.
  assert summary["ef_kernels_2_4"] is True
  assert summary["foovb_kernels_transposable_2_4"] is True
  np.testing.assert_allclose(summary["foovb_hidden_density"], [0.5, 0.5])
  assert summary["final_residual_norm"] > 0  # the EF residual holds the unsent part
  assert _images(nb) >= 4


def test_continual_notebook(kernel_env):
  summary, wall, nb = _execute("continual.ipynb", kernel_env)
  print(f"continual.ipynb (smoke) executed in {wall:.1f} s")
  assert summary["smoke"] is True
  methods = summary["methods"]
  assert set(methods) == {"SGD (lr 0.01)", "FOO-VB diagonal (BGD)"}
  for r in methods.values():
    acc = np.array(r["accuracy_matrix"])
    assert acc.shape == (3, 3) and np.isfinite(acc).all()
    assert r["average_accuracy"] == pytest.approx(acc[-1].mean())
    assert r["average_accuracy"] > 0.15  # chance: 0.1
    best_before_end = [acc[j:-1, j].max() for j in range(2)]
    assert r["forgetting"] == pytest.approx(np.mean(best_before_end - acc[-1, :2]))
  # The user's own nnx.Optimizer loop trains FOO-VB and IVON alike.
  own = summary["nnx_loop"]
  assert set(own) == {"FOO-VB diagonal (BGD)", "IVON"}
  for r in own.values():
    assert np.array(r["after_task"]).shape == (2, 2)
    assert r["after_task"][0][0] > 0.3          # learnt task 0 (chance 0.1)
    assert r["bma_accuracy"] > 0.15
    assert np.isfinite(r["nll_bma"]) and 0 <= r["ece_bma"] <= 1
  assert _images(nb) >= 2
