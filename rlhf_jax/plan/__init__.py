"""``rlhf-jax plan``: per-chip memory, FLOPs and collectives of every program of a run, compiled ahead of time.

    rlhf-jax plan CONFIG.yaml [dotted.key=value ...] --topology v5e-256 [--num-slices N] [--json out.json]

The run's programs are built by the recipes' own builders on ABSTRACT params (``jax.ShapeDtypeStruct`` from
``config.json`` only, no weights read) with the run's mesh and shardings, lowered and compiled for the topology
(abstract TPU devices from libtpu, or ``cpu-N`` simulated host devices), and measured with
``memory_analysis`` / ``cost_analysis`` and the compiled HLO's collectives.

Modules: :mod:`topology` (names -> devices), :mod:`abstract` (abstract models, states, batches),
:mod:`offline` / :mod:`online` (each command's programs), :mod:`analyze` (one compiled program's numbers),
:mod:`run` (the table), :mod:`knobs` (re-plans that would make it fit), :mod:`cli` (the command).
"""
