"""Side-by-side anchor: the published FOO-VB code (Kronecker update) on permuted digits.

Runs the matrix-variate (Kronecker) FOO-VB update of github.com/chenzeno/FOO-VB,
imported UNMODIFIED from a checkout of that repository (``--reference-dir``),
on the permuted-digits protocol of ALGORITHMS.md part D, with PyTorch on the CPU
and one thread. It is not part of sparse_jax and needs its own environment
(``requirements.txt``; PyTorch, not JAX)::

    ./fetch_reference.sh /work/.mirror/chenzeno+FOO-VB/repo /tmp/foovb-ref
    taskset -c 1 /work/venv-torch/bin/python run_reference.py \\
        --reference-dir /tmp/foovb-ref --seeds 0 --num-samples 10 --json-out out.json

The training loop drives the reference's ``utils`` functions in the order its
own ``main.train_multiple_tasks`` does (per batch and MC sample: ``gen_phi``,
``randomize_weights``, forward, ``batch_size * CrossEntropyLoss``, ``zero_grad``,
``backward``, ``weight_grad``, ``aggregate_grads``, ``aggregate_e_a``,
``aggregate_e_b``; then ``update_m``, ``update_a_b``, ``zero_matrix``). Only the
data, the model's input width and the evaluation (mean weights, copied in with
the reference's own ``update_weight``) are this harness's. See README.md for the
places where the reference's own script differs from the protocol.

Prints one JSON line per seed on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# chenzeno/FOO-VB at the newest commit when this harness was written, and the
# sha256 of its utils.py. A different commit or hash is reported in the JSON and
# warned about, never rejected.
KNOWN_COMMIT = "5aa9aaa4ce10705b0ef40a8e52076486c33df854"
KNOWN_UTILS_SHA256 = "11e8974e9f28f15ba8c0f6b7dfc8310e217d3187043a695e79ae70cfb05b8964"

NUM_TRAIN = 1400
NUM_TASKS = 10
EPOCHS = 10
BATCH = 32
WIDTHS = (64, 200, 200, 10)


# ----------------------------------------------------------------------------
# The reference code, loaded from its checkout without modification.


def load_reference(reference_dir: str) -> tuple[types.ModuleType, dict]:
  """Imports ``utils.py`` of the reference checkout under a private module name.

  The file is executed as is (``importlib``), under the name ``foovb_ref_utils``
  so that it cannot collide with any other ``utils`` module. The reference's
  ``main.py`` is not imported (it needs torchvision and downloads MNIST); its
  training loop is reproduced below call by call.
  """
  reference_dir = os.path.abspath(reference_dir)
  path = os.path.join(reference_dir, "utils.py")
  if not os.path.isfile(path):
    raise SystemExit(f"--reference-dir={reference_dir}: no utils.py there; "
                     "materialise a checkout with fetch_reference.sh")
  with open(path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  if reference_dir not in sys.path:
    sys.path.insert(0, reference_dir)  # as if run from the reference's own folder
  spec = importlib.util.spec_from_file_location("foovb_ref_utils", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["foovb_ref_utils"] = module
  spec.loader.exec_module(module)
  info = {"reference_dir": reference_dir, "reference_utils_sha256": sha,
          "reference_commit": _reference_commit(reference_dir)}
  return module, info


def _reference_commit(reference_dir: str) -> str | None:
  marker = os.path.join(reference_dir, "REFERENCE_COMMIT")
  if os.path.isfile(marker):
    with open(marker) as f:
      return f.read().strip() or None
  try:
    out = subprocess.run(["git", "-C", reference_dir, "rev-parse", "HEAD"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    return None


class Net(nn.Module):
  """The reference's ``Net200`` (main.py) with a 64-wide input instead of 784.

  Same layers, same ReLUs, same ``log_softmax`` output that the reference then
  feeds to ``nn.CrossEntropyLoss`` (log_softmax is idempotent, so this is the
  usual cross-entropy). nn.Linear's own init is irrelevant: every forward runs
  on weights the reference wrote in (``randomize_weights`` / ``update_weight``).
  """

  def __init__(self, widths=WIDTHS):
    super().__init__()
    self.fc1 = nn.Linear(widths[0], widths[1])
    self.fc2 = nn.Linear(widths[1], widths[2])
    self.fc3 = nn.Linear(widths[2], widths[3])

  def forward(self, x):
    x = F.relu(self.fc1(x))
    x = F.relu(self.fc2(x))
    x = self.fc3(x)
    return F.log_softmax(x, dim=1)


# ----------------------------------------------------------------------------
# Protocol (ALGORITHMS.md part D).


def load_protocol_data(num_tasks: int):
  """Returns per-task train/test inputs (torch float32) and labels (int64), perms."""
  from sklearn.datasets import load_digits
  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int64)
  split = np.random.default_rng(0).permutation(len(y))
  tr, te = split[:NUM_TRAIN], split[NUM_TRAIN:]
  perms = [np.arange(64)] + [np.random.default_rng(1000 + t).permutation(64)
                             for t in range(1, num_tasks)]
  x_tr = [torch.from_numpy(np.ascontiguousarray(x[tr][:, p])) for p in perms]
  x_te = [torch.from_numpy(np.ascontiguousarray(x[te][:, p])) for p in perms]
  return x_tr, torch.from_numpy(y[tr]), x_te, torch.from_numpy(y[te]), perms


def evaluate_mean(ref, model, weight_lst, m_mat_lst, x_te, y_te, tasks):
  """Test accuracy (%) per task with the MEAN weights M (reference's update_weight)."""
  ref.update_weight(weight_lst, m_mat_lst)
  model.eval()
  accs = []
  with torch.no_grad():
    for t in tasks:
      pred = model(x_te[t]).argmax(dim=1)
      accs.append(100.0 * pred.eq(y_te).sum().item() / len(y_te))
  return accs


def run_seed(ref, seed: int, num_samples: int, num_tasks: int, epochs: int,
             eta: float, alpha: float, s_init: float, short_batch: str,
             track: bool, log) -> dict:
  t_total = time.perf_counter()
  device = torch.device("cpu")
  x_tr, y_tr, x_te, y_te, _ = load_protocol_data(num_tasks)
  # The reference's main(): utils.set_seed(args.seed), then the model, then
  # init_param(weight_lst, s_init, device, True, alpha) (the alpha-split init).
  ref.set_seed(seed)
  model = Net().to(device)
  weight_lst = ref.weight_lst(model)
  w_mat_lst, m_mat_lst, a_mat_lst, b_mat_lst, avg_psi_mat_lst, e_a_mat_lst, e_b_mat_lst = \
      ref.init_param(weight_lst, s_init, device, True, alpha)
  # The attributes the reference's aggregate_* read from its argparse namespace.
  args = argparse.Namespace(train_mc_iters=num_samples, batch_size=BATCH, eta=eta,
                            use_gsvd=False)
  criterion = nn.CrossEntropyLoss()
  order_rng = np.random.default_rng(100 + seed)
  n_batches = math.ceil(NUM_TRAIN / BATCH)
  after_task = []
  train_wall = 0.0
  for task in range(num_tasks):
    t_task = time.perf_counter()
    x_task = x_tr[task]
    for _ in range(epochs):
      order = torch.from_numpy(order_rng.permutation(NUM_TRAIN))
      for b in range(n_batches):
        idx = order[b * BATCH:(b + 1) * BATCH]
        data, target = x_task[idx], y_tr[idx]
        # Reference: loss = args.batch_size * criterion(output, target), i.e. a
        # short last batch (24) is scaled by the nominal 32. "actual" = true sum.
        scale = args.batch_size if short_batch == "nominal" else len(idx)
        model.train()
        # ---- main.train_multiple_tasks, one batch, verbatim call order ----
        for _mc in range(args.train_mc_iters):
          phi_mat_lst = ref.gen_phi(w_mat_lst, device)
          ref.randomize_weights(weight_lst, w_mat_lst, m_mat_lst, a_mat_lst,
                                b_mat_lst, phi_mat_lst)
          output = model(data)
          loss = scale * criterion(output, target)
          ref.zero_grad(weight_lst)
          loss.backward()
          grad_mat_lst = ref.weight_grad(weight_lst, device)
          ref.aggregate_grads(args, avg_psi_mat_lst, grad_mat_lst)
          ref.aggregate_e_a(args, e_a_mat_lst, grad_mat_lst, b_mat_lst, phi_mat_lst)
          ref.aggregate_e_b(args, e_b_mat_lst, grad_mat_lst, a_mat_lst, phi_mat_lst)
        ref.update_m(m_mat_lst, a_mat_lst, b_mat_lst, avg_psi_mat_lst, args.eta)
        ref.update_a_b(a_mat_lst, b_mat_lst, e_a_mat_lst, e_b_mat_lst, device,
                       args.use_gsvd)
        ref.zero_matrix(avg_psi_mat_lst, e_a_mat_lst, e_b_mat_lst)
        # --------------------------------------------------------------------
    train_wall += time.perf_counter() - t_task
    if track:  # mean weights only: draws no random numbers, untimed
      accs = evaluate_mean(ref, model, weight_lst, m_mat_lst, x_te, y_te,
                           range(task + 1))
      after_task.append([round(a, 4) for a in accs])
      log(f"seed {seed} task {task} done: train {train_wall:.1f} s, "
          f"mean-weight test acc on tasks 0..{task}: "
          + " ".join(f"{a:.1f}" for a in accs))
    else:
      log(f"seed {seed} task {task} done: train {train_wall:.1f} s")
  per_task = evaluate_mean(ref, model, weight_lst, m_mat_lst, x_te, y_te,
                           range(num_tasks))
  total_wall = time.perf_counter() - t_total
  result = {
      "seed": seed,
      "num_samples": num_samples,
      "final_average_accuracy": round(float(np.mean(per_task)), 4),
      "per_task": [round(a, 4) for a in per_task],
      "train_wall_s": round(train_wall, 3),
      "total_wall_s": round(total_wall, 3),
      "torch_version": torch.__version__,
      "threads": torch.get_num_threads(),
      "tasks": num_tasks,
      "epochs": epochs,
      "eta": eta,
      "alpha": alpha,
      "batch_size": BATCH,
      "short_batch_scale": short_batch,
  }
  if track:
    result["after_task"] = after_task
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference-dir", default=os.environ.get("FOOVB_REFERENCE_DIR"),
                      help="checkout of github.com/chenzeno/FOO-VB (holds utils.py); "
                           "default $FOOVB_REFERENCE_DIR")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--num-samples", type=int, default=10,
                      help="K, MC samples per batch (reference: --train_mc_iters)")
  parser.add_argument("--eta", type=float, default=1.0, help="reference default 1")
  parser.add_argument("--alpha", type=float, default=0.5, help="reference default 0.5")
  parser.add_argument("--s-init", type=float, default=0.27,
                      help="reference default; unused by the alpha-split init its "
                           "main script selects")
  parser.add_argument("--short-batch-scale", choices=["nominal", "actual"],
                      default="nominal",
                      help="loss of the short last batch: 'nominal' = 32 x mean, as the "
                           "reference's main.py; 'actual' = true sum (24 x mean)")
  parser.add_argument("--tasks", type=int, default=NUM_TASKS)
  parser.add_argument("--epochs", type=int, default=EPOCHS)
  parser.add_argument("--smoke", action="store_true",
                      help="2 tasks x 1 epoch: checks that everything runs")
  parser.add_argument("--no-track", dest="track", action="store_false",
                      help="skip the (untimed, RNG-free) mean-weight evaluation "
                           "after each task")
  parser.add_argument("--threads", type=int, default=1,
                      help="torch.set_num_threads (the protocol: 1)")
  parser.add_argument("--json-out", help="also write {config, runs} here (after each seed)")
  args = parser.parse_args(argv)
  if not args.reference_dir:
    parser.error("--reference-dir (or $FOOVB_REFERENCE_DIR) is required")
  if args.smoke:
    args.tasks, args.epochs = 2, 1
  if not 1 <= args.tasks <= NUM_TASKS:
    parser.error(f"--tasks must be in 1..{NUM_TASKS}")

  torch.set_num_threads(args.threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  # The reference uses torch.add(x, alpha, y), a deprecated overload that still
  # computes x + alpha*y; silence only that one warning.
  warnings.filterwarnings("ignore", message="This overload of add is deprecated")

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  ref, info = load_reference(args.reference_dir)
  if info["reference_commit"] not in (None, KNOWN_COMMIT):
    log(f"note: reference commit {info['reference_commit']} != {KNOWN_COMMIT} "
        "(the one this harness was written against)")
  if info["reference_utils_sha256"] != KNOWN_UTILS_SHA256:
    log(f"WARNING: {info['reference_dir']}/utils.py sha256 "
        f"{info['reference_utils_sha256']} != {KNOWN_UTILS_SHA256} (commit "
        f"{KNOWN_COMMIT[:7]}): not the unmodified reference this harness expects")
  config = dict(info, harness="benchmarks/anchors/foovb_reference/run_reference.py",
                python=platform.python_version(), numpy_version=np.__version__,
                torch_version=torch.__version__, threads=torch.get_num_threads(),
                cpu_affinity=sorted(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else None,
                argv=sys.argv[1:] if argv is None else list(argv),
                smoke=args.smoke)
  log(json.dumps(config))
  runs = []
  for seed in args.seeds:
    result = run_seed(ref, seed, args.num_samples, args.tasks, args.epochs,
                      args.eta, args.alpha, args.s_init, args.short_batch_scale,
                      args.track, log)
    result["reference_commit"] = info["reference_commit"]
    runs.append(result)
    print(json.dumps(result), flush=True)
    if args.json_out:
      tmp = args.json_out + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"config": config, "runs": runs}, f, indent=1)
      os.replace(tmp, args.json_out)


if __name__ == "__main__":
  main()
