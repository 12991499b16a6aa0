"""FOO-VB speed (ratios measured in one run) and an optional digits sanity run.

    python -m benchmarks.foovb [--quick] [--digits [--seeds 3] [--covariance diagonal]]

Rows (all jitted, CPU, min over repeats):

1. ``diag update``: one ``foovb(covariance="diagonal")`` update on the params of
   an MLP, as a ratio to one ``optax.adam`` update on the same params (target
   <= 1.2). The update regenerates the K Gaussian noise arrays from the key,
   so it is also reported next to the cost of generating that noise alone, and
   the posterior algebra without the noise (given ``gbar`` and ``geps``).
2. ``vmap grads``: the K gradients at K samples via ``jax.vmap(jax.grad)``, as a
   ratio to K times the minimum time of one gradient evaluation (target <= 1.2).
3. ``train step``: the Kronecker update's share of a whole jitted train step
   (sample, K gradients, update), ``1 - t(same step with a plain SGD step
   instead of the update) / t(step)``, on an MLP and a small CNN (and the
   diagonal one's, for comparison).
4. ``train step K / K x adam train step``: a whole FOO-VB train step with K
   samples over K Adam train steps (each of those also takes one forward and
   backward pass; target <= 1.2 for the diagonal posterior), and the Kronecker
   update alone over one Adam update on the mean gradient (target <= 3) and
   over K Adam updates.

Measured in a fresh process WITHOUT ``OPENBLAS_NUM_THREADS`` (the library
pins jaxlib's LAPACK to one thread by itself).

``--digits`` also runs the ALGORITHMS.md part D protocol (permuted digits, 10
tasks x 10 epochs, MLP 64-200-200-10, K=10, eta=1, batch 32, summed loss) and
records the final average accuracy of the mean weights and the wall time.
Writes benchmarks/results/foovb.json.
"""

from __future__ import annotations

import os

# No OPENBLAS_NUM_THREADS here: the library pins jaxlib's LAPACK threads itself
# (sparse_jax._core.lapack); these numbers are what a user's own script gets.

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.timing import Report, time_fn  # noqa: E402
from sparse_jax.bayes import fixed_point as fp  # noqa: E402
from sparse_jax.bayes.transform import (  # noqa: E402
    alpha_split_init, foovb, foovb_sample)

# ----------------------------------------------------------------------------
# Models as plain jnp params.


def mlp_params(sizes, seed=0):
  """Glorot-uniform kernels, zero biases (the PyTorch reference's Xavier init)."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    lim = math.sqrt(6.0 / (a + b))
    params[f"dense{i}"] = {
        "kernel": jnp.asarray(rng.uniform(-lim, lim, size=(a, b)), jnp.float32),
        "bias": jnp.zeros((b,), jnp.float32)}
  return params


def mlp_apply(params, x):
  x = x.reshape(x.shape[0], -1)
  n = len(params)
  for i in range(n):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def summed_ce(apply_fn):
  def loss(params, x, y, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y)
    return jnp.sum(ce * w)
  return loss


def cnn_model():
  from flax import nnx

  from sparse_jax.models import CNN
  model = CNN((8, 8, 1), 10, features=(16, 32), dense=64, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)

  def apply(p, x):
    return nnx.merge(graphdef, p)(x)
  return params, apply


def num_params(params):
  return int(sum(x.size for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------
# 1. Diagonal update vs Adam.


def stepper(tx, params, grads):
  """One ``tx`` update + ``apply_updates`` as a train loop runs it.

  Params and state are donated and fed back each call (fresh output buffers
  cost page faults on a VM that dwarf a memory-bound update, and made the
  Adam reference swing 0.8-5 ms on 1.8M params between runs).
  """
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  copy = lambda t: jax.tree.map(jnp.copy, t)  # no buffer shared with the caller
  carry = [copy(params), copy(tx.init(params))]

  def run():
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    return carry
  return run


def bench_diag_update(report, sizes, num_samples_list, repeats):
  params = mlp_params(sizes)
  n = num_params(params)
  rng = np.random.default_rng(0)
  grads1 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  t_adam = time_fn(stepper(optax.adam(1e-3), params, grads1), repeats=repeats)
  report.add(f"adam update {sizes}", t_adam, params=n)

  # The posterior algebra alone (gbar, geps given): BGD mean and std steps.
  std = jax.tree.map(lambda p: jnp.full(p.shape, 0.05, p.dtype), params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def algebra(mean, std, gbar, geps):
    new_mean = jax.tree.map(lambda m, s, g: m - s * s * g, mean, std, gbar)
    new_std = jax.tree.map(fp.diagonal_std_update, std, geps)
    return new_mean, new_std

  carry = [jax.tree.map(jnp.copy, params), std]

  def run_algebra():
    carry[0], carry[1] = algebra(carry[0], carry[1], grads1, grads1)
    return carry

  t_alg = time_fn(run_algebra, repeats=repeats)
  report.add(f"diag posterior algebra (no noise) / adam {sizes}", t_alg,
             reference=t_adam, target=1.2, params=n)

  for k in num_samples_list:
    tx = foovb(num_samples=k, init_std=0.05)
    state = tx.init(params)
    grads = jax.tree.map(lambda g: jnp.broadcast_to(g, (k,) + g.shape) * 1.0, grads1)
    t_upd = time_fn(stepper(tx, params, grads), repeats=repeats)
    noise = jax.jit(lambda key: [jax.random.normal(jax.random.fold_in(key, i),
                                                   (k,) + p.shape)
                                 for i, p in enumerate(jax.tree.leaves(params))])
    t_noise = time_fn(lambda: noise(state.key), repeats=repeats)
    report.add(f"diag update K={k} / adam {sizes}", t_upd, reference=t_adam,
               target=1.2, params=n, num_samples=k)
    report.add(f"diag update K={k} / its noise generation {sizes}", t_upd,
               reference=t_noise, params=n, num_samples=k,
               noise_ns_per_number=t_noise["min"] / (k * n) * 1e9)


# ----------------------------------------------------------------------------
# 2. K gradients via vmap vs K separate evaluations.


def random_batch(sizes, batch, *, seed):
  """``(x, y, w)``: a random batch for an MLP of ``sizes``, unit weights."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], size=batch), jnp.int32)
  return x, y, jnp.ones((batch,), jnp.float32)


def bench_vmap_grads(report, sizes, batch, k, repeats):
  params = mlp_params(sizes)
  x, y, w = random_batch(sizes, batch, seed=1)
  loss = summed_ce(mlp_apply)
  state = foovb(num_samples=k, init_std=0.05).init(params)
  samples = foovb_sample(state, k)
  one = jax.jit(jax.grad(loss))
  many = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None, None, None)))
  sample0 = jax.tree.map(lambda s: s[0], samples)
  t_one = time_fn(lambda: one(sample0, x, y, w), repeats=repeats * 3)
  t_many = time_fn(lambda: many(samples, x, y, w), repeats=repeats)
  k_times = {"min": k * t_one["min"], "median": k * t_one["median"]}
  report.add(f"vmap grads K={k} / K x one grad, MLP {sizes} batch {batch}",
             t_many, reference=k_times, target=1.2, num_samples=k,
             params=num_params(params))


# ----------------------------------------------------------------------------
# 3. Share of the update in a train step.


def bench_step_share(report, name, params, apply_fn, batch, k, covariance, repeats):
  """Share of the update in a jitted train step: 1 - t(step without it) / t(step).

  The step without the update draws the same samples and takes the same K
  gradients, then applies their mean as a plain SGD step (so nothing is dead
  code). Also reported: the update and the sampling jitted alone, over the step.
  """
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(batch, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  w = jnp.ones((batch,), jnp.float32)
  loss = summed_ce(apply_fn)
  tx = foovb(covariance=covariance, num_samples=k, init_std=0.05)
  state = tx.init(params)
  grads_fn = jax.vmap(jax.grad(loss), in_axes=(0, None, None, None))

  @jax.jit
  def step(params, state):
    grads = grads_fn(foovb_sample(state, k), x, y, w)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def step_without_update(params, state):
    grads = grads_fn(foovb_sample(state, k), x, y, w)
    # mean over the samples as a weighted sum (a leading-axis reduction is
    # slow on XLA CPU and would inflate this reference)
    updates = jax.tree.map(
        lambda g: jnp.tensordot(jnp.full((k,), -1e-3 / k), g, axes=1), grads)
    return optax.apply_updates(params, updates), state

  samples = foovb_sample(state, k)
  grads = jax.jit(grads_fn)(samples, x, y, w)
  update = jax.jit(tx.update)
  sample = jax.jit(lambda s: foovb_sample(s, k))
  t_step = time_fn(lambda: step(params, state), repeats=repeats)
  t_rest = time_fn(lambda: step_without_update(params, state), repeats=repeats)
  t_upd = time_fn(lambda: update(grads, state, params), repeats=repeats)
  t_smp = time_fn(lambda: sample(state), repeats=repeats)
  report.add(f"{covariance} train step, {name}", t_step, params=num_params(params),
             num_samples=k, batch=batch, steps_per_s=1.0 / t_step["min"],
             update_share=1.0 - t_rest["min"] / t_step["min"],
             update_alone_over_step=t_upd["min"] / t_step["min"],
             sample_alone_over_step=t_smp["min"] / t_step["min"])


# ----------------------------------------------------------------------------
# 4. Whole train steps with K samples vs K Adam train steps; the kron update
#    alone vs an Adam update.


def bench_step_vs_adam(report, name, params, apply_fn, x, k, repeats):
  """``t(FOO-VB train step, K samples) / (K t(Adam train step))`` (target 1.2).

  The honest ratio: a FOO-VB step takes K forward/backward passes (one per
  sample), which K Adam steps also take; what is left is the cost of the
  sampling (K Gaussian draws per parameter) and of the update. Also: the
  Kronecker update alone (given the K gradients) over one Adam update on
  their mean (target 3) and over K Adam updates.
  """
  rng = np.random.default_rng(3)
  batch = x.shape[0]
  y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  w = jnp.ones((batch,), jnp.float32)
  loss = summed_ce(apply_fn)
  adam = optax.adam(1e-3)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def adam_step(p, s):
    u, s = adam.update(jax.grad(loss)(p, x, y, w), s, p)
    return optax.apply_updates(p, u), s

  grads_fn = jax.vmap(jax.grad(loss), in_axes=(0, None, None, None))

  def foovb_stepper(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
      u, s = tx.update(grads_fn(foovb_sample(s, k), x, y, w), s, p)
      return optax.apply_updates(p, u), s
    return step

  def runner(step, state):
    carry = [jax.tree.map(jnp.copy, params), state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1])
      return carry
    return run

  t_adam = time_fn(runner(adam_step, adam.init(params)), repeats=repeats * 3)
  k_adam = {"min": k * t_adam["min"], "median": k * t_adam["median"]}
  report.add(f"adam train step, {name} batch {batch}", t_adam,
             params=num_params(params))
  for cov in ("diagonal", "kron"):
    tx = foovb(covariance=cov, num_samples=k, init_std=0.05)
    t = time_fn(runner(foovb_stepper(tx), tx.init(params)), repeats=repeats)
    report.add(f"{cov} train step K={k} / K x adam train step, {name}",
               t, reference=k_adam, target=1.2 if cov == "diagonal" else None,
               num_samples=k, batch=batch)
  tx = foovb(covariance="kron", num_samples=k, init_std=0.05)
  grads = jax.jit(grads_fn)(foovb_sample(tx.init(params), k), x, y, w)
  gbar = jax.tree.map(lambda g: g.mean(0), grads)
  t_kron = time_fn(stepper(tx, params, grads), repeats=repeats)
  t_one = time_fn(stepper(adam, params, gbar), repeats=repeats * 3)
  report.add(f"kron update K={k} / adam update on the mean grad, {name}",
             t_kron, reference=t_one, target=3.0, num_samples=k)
  report.add(f"kron update K={k} / K adam updates, {name}", t_kron,
             reference={"min": k * t_one["min"], "median": k * t_one["median"]},
             num_samples=k)


# ----------------------------------------------------------------------------
# Digits sanity run (ALGORITHMS.md part D).


def digits_protocol(seed, covariance, init_std, epochs=10, tasks=10, k=10,
                    batch=32):
  """Returns (final average test accuracy of the mean weights, per-task, wall s).

  Means: Glorot-uniform kernels and zero biases ("kron": the paper's alpha-split
  draw, :func:`alpha_split_init`). The wall time includes compilation.
  """
  from sklearn.datasets import load_digits
  data = load_digits()
  x_all = (data.data / 16.0).astype(np.float32)
  y_all = data.target.astype(np.int32)
  split = np.random.default_rng(0).permutation(len(y_all))
  tr, te = split[:1400], split[1400:]
  perms = [np.arange(64)] + [np.random.default_rng(1000 + t).permutation(64)
                             for t in range(1, tasks)]
  order_rng = np.random.default_rng(100 + seed)
  n_batches = math.ceil(1400 / batch)
  idx = np.zeros((tasks, epochs, n_batches, batch), np.int32)
  wts = np.zeros((tasks, epochs, n_batches, batch), np.float32)
  for t in range(tasks):
    for e in range(epochs):
      order = order_rng.permutation(1400)
      for b in range(n_batches):
        chunk = order[b * batch:(b + 1) * batch]
        idx[t, e, b, :len(chunk)] = chunk
        wts[t, e, b, :len(chunk)] = 1.0
  x_tasks = jnp.asarray(np.stack([x_all[tr][:, p] for p in perms]))   # (T, 1400, 64)
  y_tr = jnp.asarray(y_all[tr])
  params = mlp_params((64, 200, 200, 10), seed=seed)
  if covariance == "kron":  # the paper's alpha-split init of the means
    params = alpha_split_init(params, seed)
  tx = foovb(covariance=covariance, num_samples=k, init_std=init_std, eta=1.0,
             key=seed)
  loss = summed_ce(mlp_apply)
  grads_fn = jax.vmap(jax.grad(loss), in_axes=(0, None, None, None))

  @jax.jit
  def train(params, state, idx, wts):
    def task_body(carry, inputs):
      x_t, idx_t, w_t = inputs

      def step(carry, batch_in):
        params, state = carry
        i, w = batch_in
        grads = grads_fn(foovb_sample(state, k), x_t[i], y_tr[i], w)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None
      flat_idx = idx_t.reshape(-1, batch)
      flat_w = w_t.reshape(-1, batch)
      return jax.lax.scan(step, carry, (flat_idx, flat_w))[0], None
    return jax.lax.scan(task_body, (params, state), (x_tasks, idx, wts))[0]

  t0 = time.perf_counter()
  params, state = jax.block_until_ready(train(params, tx.init(params),
                                              jnp.asarray(idx), jnp.asarray(wts)))
  wall = time.perf_counter() - t0
  accs = []
  for p in perms:
    logits = mlp_apply(params, jnp.asarray(x_all[te][:, p]))
    accs.append(float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_all[te]))))
  return float(np.mean(accs)), accs, wall


# ----------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
  parser.add_argument("--digits", action="store_true",
                      help="also run the permuted-digits sanity protocol")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--covariance", default="diagonal",
                      choices=["diagonal", "kron"])
  parser.add_argument("--init-std", type=float, default=0.05)
  args = parser.parse_args(argv)
  repeats = 5 if args.quick else 20
  report = Report("foovb", quick=args.quick,
                  openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"))
  sizes_list = [(64, 200, 200, 10)] + ([] if args.quick else [(784, 1000, 1000, 10)])
  for sizes in sizes_list:
    bench_diag_update(report, sizes, [1] if args.quick else [1, 10], repeats)
  bench_vmap_grads(report, (64, 200, 200, 10), 32, 10, repeats)
  if not args.quick:
    bench_vmap_grads(report, (784, 400, 400, 10), 128, 10, repeats)
  x_digits = jnp.asarray(np.random.default_rng(2).normal(size=(32, 8, 8, 1)),
                         jnp.float32)
  k_step = 4 if args.quick else 10
  bench_step_vs_adam(report, "MLP (64, 200, 200, 10)",
                     mlp_params((64, 200, 200, 10)), mlp_apply, x_digits, k_step,
                     repeats)
  cnn_params, cnn_apply = cnn_model()
  bench_step_vs_adam(report, "CNN 8x8 (16, 32) conv + dense 64", cnn_params,
                     cnn_apply, x_digits, k_step, repeats)
  k = 4 if args.quick else 10
  mlp_sizes = (64, 100, 10) if args.quick else (64, 200, 200, 10)
  for cov in ("kron", "diagonal"):
    bench_step_share(report, f"MLP {mlp_sizes}", mlp_params(mlp_sizes),
                     mlp_apply, 32, k, cov, repeats)
    cnn_params, cnn_apply = cnn_model()
    bench_step_share(report, "CNN 8x8 (16, 32) conv + dense 64", cnn_params,
                     cnn_apply, 32, k, cov, repeats)
  if args.digits:
    for seed in range(args.seeds):
      acc, accs, wall = digits_protocol(seed, args.covariance, args.init_std,
                                        epochs=2 if args.quick else 10)
      report.add(f"permuted digits {args.covariance} std_init {args.init_std} "
                 f"seed {seed}", None, final_avg_accuracy=acc,
                 per_task=[round(a, 4) for a in accs], wall_s=wall)
  report.write()


if __name__ == "__main__":
  main()
