"""End-to-end N:M training through the config registry: deployed weights are N:M."""

import os

import jax
import numpy as np
import pytest

from sparse_jax.masks import is_nm_sparse, is_transposable_nm_sparse
from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.config import load_config_module
from sparse_jax.training.loop import build_run, train_and_evaluate
from sparse_jax.training.optim import build_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _get_config(arg):
  c = load_config_module(os.path.join(ROOT, "configs", "nm_teacher.py")).get_config(arg)
  c.data.num_train = 2000
  c.data.num_test = 500
  return c


@pytest.mark.parametrize("pattern,method", [("nm24", "proj"), ("t24", "ste"),
                                            ("nm14", "srste"), ("t48", "proj"),
                                            ("nm48", "sste")])
def test_deployed_weights_are_nm(pattern, method, tmp_path):
  config = _get_config(f"{pattern},{method},smoke")
  results = train_and_evaluate(config, str(tmp_path))
  n, m, transposable = {"nm24": (2, 4, False), "nm14": (1, 4, False),
                        "nm48": (4, 8, False), "t24": (2, 4, True),
                        "t48": (4, 8, True)}[pattern]
  _, _, _, template = build_run(config)
  ckpt = Checkpointer(str(tmp_path))
  state = ckpt.restore_latest(template)
  ckpt.close()
  forward = build_forward(config.train.forward, init_params=template.params)
  weights = state.params if forward is None else forward(state.params)
  for layer in weights["hidden"].values():
    kernel = np.asarray(layer["kernel"])
    assert bool(is_nm_sparse(kernel, n, m)), (pattern, method)
    if transposable:
      assert bool(is_transposable_nm_sparse(kernel, n, m))
  if method in ("proj", "srste"):  # mask states in the optimizer: diagnostics logged
    from sparse_jax.training.metrics import read_metrics
    logged = [r for r in read_metrics(str(tmp_path)) if r["split"] == "sparsity"]
    # projection: the stored weights are sparse; SR-STE keeps them dense (the mask
    # acts in the forward pass), so only its mask sparsity is 1 - n/m.
    key = "all/sparsity" if method == "proj" else "all/mask_sparsity"
    assert logged and logged[-1][key] == pytest.approx(1 - n / m, abs=1e-6)
    assert 0 < logged[-1]["all/kept_mass"] <= 1
  # the head is excluded: dense
  assert np.count_nonzero(np.asarray(weights["head"]["kernel"])) == weights["head"]["kernel"].size
  kernels = sum(l["kernel"].size for l in weights["hidden"].values())
  expected = (results["num_params"] - kernels * (1 - n / m)) / results["num_params"]
  assert results["density"] == pytest.approx(expected, abs=1e-3)


def test_bad_variant_combination():
  with pytest.raises(ValueError, match="one pattern"):
    _get_config("nm24")


def test_dense_finetuning_ends_the_sparse_phase(tmp_path):
  """sr_ste + nm_ste with dense fine-tuning from step 10 of 20: the run ends
  with dense weights, and the decay stopped with the masked forward pass."""
  config = _get_config("nm24,srste,smoke")
  from sparse_jax.training.config import nm_sparsify
  nm_sparsify(config, 2, 4, "srste", dense_finetune_from=10)
  assert config.train.forward_until == 10
  results = train_and_evaluate(config, str(tmp_path))
  assert results["density"] == pytest.approx(1.0)
  bad = _get_config("nm24,srste,smoke")
  bad.train.forward_until = 10   # sr_ste's end_step left at None
  with pytest.raises(ValueError, match="end_step=None but config.train.forward_until=10"):
    train_and_evaluate(bad, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="no transposable form"):
    nm_sparsify(_get_config(None), 2, 4, "sste", transposable=True)
