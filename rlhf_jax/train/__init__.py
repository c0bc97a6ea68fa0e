"""Training substrate: sharded train state, generic jitted steps (accumulation, NaN guard), optimizers,
metrics. Import the submodules directly (`rlhf_jax.train.state`, `rlhf_jax.train.step`, ...)."""
