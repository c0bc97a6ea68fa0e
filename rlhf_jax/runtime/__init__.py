"""Environment plumbing, set up before (or outside) any model code runs.

* :mod:`~rlhf_jax.runtime.distributed`: ``jax.distributed`` init from the environment (local launcher,
  SLURM, TPU pods), the watchdog that names a dead host, small host-side collectives.
* :mod:`~rlhf_jax.runtime.host_memory`: glibc allocator tunables for XLA:CPU (re-exec at start-up).
* :mod:`~rlhf_jax.runtime.xla`: XLA compiler options per program kind, the persistent compilation cache.
* :mod:`~rlhf_jax.runtime.clock`: seconds since the process started (the host loop's time to first step).
"""
