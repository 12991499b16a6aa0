"""sparse_jax: sparse and Bayesian training for JAX/Flax."""
