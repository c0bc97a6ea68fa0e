"""`rlhf-jax` / `python -m rlhf_jax`: one sub-command per trainer, plus `demo`.

    rlhf-jax sft CONFIG.yaml [dotted.key=value ...] [--print-config]
    rlhf-jax rm  CONFIG.yaml [dotted.key=value ...]
    rlhf-jax demo [OUT_DIR] [--out DIR] [--quick]

A recipe is registered with ONE line in `rlhf_jax.recipes.REGISTRY` (`name: (module, config class, help)`);
the module defines `train(cfg) -> dict`. Modules are imported only when their command runs, so `--help`
stays fast.

Config, data and model-file errors (bad key, wrong type, missing file, malformed row, ...) are printed as
one line on stderr and exit with status 2; set RLHF_JAX_TRACEBACK=1 to see the traceback instead.
SIGTERM / SIGINT during training: the step finishes, a checkpoint is committed, exit status 143 / 130
(`rlhf_jax.train.preempt`); the same command resumes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from rlhf_jax.recipes import REGISTRY, load_trainer_config, trainer_config_class  # noqa: F401 (public)

TRAINERS = REGISTRY  # the recipes' registry (`rlhf_jax.recipes.REGISTRY`), read here and by the demo

EXIT_USER_ERROR = 2

#: commands driven by flags instead of a YAML config: name -> module with HELP, add_arguments(parser), main(args)
TOOLS = {"eval": "rlhf_jax.recipes.evaluate", "generate": "rlhf_jax.recipes.generate", "chat": "rlhf_jax.recipes.chat",
         "plan": "rlhf_jax.plan.cli"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-jax", description="JAX-native RLHF trainers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_) in TRAINERS.items():
        s = sub.add_parser(name, help=help_, description=f"{help_}. Overrides are dotted key=value pairs.")
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-5")
        s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    d = sub.add_parser("demo", help="tiny offline end-to-end run on CPU (SFT -> reward model -> RL)")
    d.add_argument("out_pos", nargs="?", default=None, metavar="OUT_DIR", help="output folder (default runs/demo)")
    d.add_argument("--out", default=None, help="output folder (same as OUT_DIR)")
    d.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    for name, module in TOOLS.items():  # flag-driven commands; the modules import jax only in main(args)
        m = importlib.import_module(module)
        m.add_arguments(sub.add_parser(name, help=m.HELP, description=m.HELP))
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (config, data, model files), reported without a traceback."""
    from rlhf_jax.config import ConfigError

    # Every ValueError in rlhf_jax is written as a user-facing message naming the key/file/row/field
    # (ConfigError, DataFileError, MalformedRowError and ModelLoadError are ValueErrors).
    return (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, KeyError)


def _write_curves(output_dir: Optional[str], command: str) -> None:
    """``curves.png`` next to ``metrics.jsonl`` (``train.plots.plot_curves``: losses, scores, KL, lengths,
    held-out metrics); a run with nothing to plot gets none."""
    from rlhf_jax.train.plots import plot_curves

    metrics = os.path.join(output_dir or "", "metrics.jsonl")
    if output_dir and os.path.isfile(metrics):
        try:
            plot_curves(metrics, os.path.join(output_dir, "curves.png"), title=f"{command}: {output_dir}")
        except ValueError:  # no plottable metric logged
            pass


def quiet_datasets() -> None:
    """No ``datasets`` progress bars (``Generating train split: ...``, ``Map: ...``) in the CLI's output: files are
    local and small next to training, and the bars bury the trainers' own lines. ``HF_DATASETS_DISABLE_PROGRESS_BARS=0``
    in the environment brings them back."""
    if os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1") == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()  # imported before main() (tests): the variable is read at import


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from rlhf_jax import demo

        out = args.out or args.out_pos or "runs/demo"
        demo.run_demo(out, quick=args.quick)
        return 0
    if args.command in TRAINERS:
        from rlhf_jax.runtime import distributed, xla
        from rlhf_jax.config import save_config

        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"config file {args.config} not found")
        cfg = load_trainer_config(args.command, args.config, args.overrides)
        if args.print_config:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                print(save_config(cfg, os.path.join(tmp, "c.yaml")).read_text(), end="")
            return 0
        distributed.init_distributed()
        from rlhf_jax.train.preflight import preflight

        preflight(cfg)  # config-only checks (warmup, batch vs mesh) before any model or data is loaded
        xla.enable_compilation_cache()  # a rerun or resume of this config loads its compiled programs
        module = importlib.import_module(TRAINERS[args.command][0])
        result = module.train(cfg)
        if distributed.is_main_process():
            _write_curves(result.get("output_dir"), args.command)
            print(f"[rlhf_jax] {args.command} done: outputs in {result.get('output_dir')}")
        return 0
    if args.command in TOOLS:
        return importlib.import_module(TOOLS[args.command]).main(args)
    raise AssertionError(args.command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    if argv is None:  # a real command line: restart once with the host allocator tunable (host_memory.py)
        from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

        sampling_only = len(sys.argv) > 1 and sys.argv[1] in TOOLS  # eval / generate / chat: no heap layer
        reexec_with_host_tunables(["-m", "rlhf_jax", *sys.argv[1:]], heap=not sampling_only)
    args = _parser().parse_args(argv)
    quiet_datasets()
    from rlhf_jax.train.preempt import Preempted

    if os.environ.get("RLHF_JAX_TRACEBACK"):  # errors keep their traceback; a preemption is no error
        try:
            return _run(args)
        except Preempted as e:
            return e.exit_code
    try:
        return _run(args)
    except Preempted as e:  # SIGTERM/SIGINT: checkpoint committed, message printed by the loop
        return e.exit_code
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"rlhf-jax {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as e:  # NonFiniteError, consecutive-skip limit, peer failures: clean, status 1
        print(f"rlhf-jax {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlhf-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
