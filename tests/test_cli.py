"""CLI: registry, config errors as one clean line with exit status 2, every YAML in configs/ parses."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from rlhf_jax import cli
from rlhf_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _trainer_of(path: pathlib.Path) -> str:
    """The trainer a config's usage comment names (`rlhf-jax <trainer> configs/<file>`), else the file name's
    prefix: configs are named <trainer>_<what>.yaml (the longest registered trainer name that fits)."""
    usage = re.search(rf"rlhf-jax (\w+) configs/{re.escape(path.name)}", path.read_text())
    if usage:
        return usage.group(1)
    names = [n for n in cli.TRAINERS if path.name.startswith(n + "_")]
    return max(names, key=len) if names else path.name.split("_", 1)[0]


def test_there_are_configs_for_each_registered_trainer():
    assert {"sft", "rm"} <= {_trainer_of(p) for p in CONFIGS}
    assert {p.name for p in CONFIGS} >= {"sft_tiny_cpu.yaml", "rm_tiny_cpu.yaml", "sft_llama3_8b_v5e256.yaml",
                                         "rm_llama3_8b_8xh100.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_with_its_trainer_class(path):
    name = _trainer_of(path)
    assert name in cli.TRAINERS, f"{path.name}: no registered trainer {name!r}"
    cfg = cli.load_trainer_config(name, str(path))
    assert isinstance(cfg, cli.trainer_config_class(name))
    assert cfg.model.path and cfg.data.path


def test_realistic_meshes():
    sft = cli.load_trainer_config("sft", str(REPO / "configs/sft_llama3_8b_v5e256.yaml"))
    assert sft.mesh.shape(256) == (1, 256, 1)
    rm = cli.load_trainer_config("rm", str(REPO / "configs/rm_llama3_8b_8xh100.yaml"))
    assert rm.mesh.shape(8) == (1, 8, 1)


def test_overrides_apply():
    cfg = cli.load_trainer_config("rm", str(REPO / "configs/rm_tiny_cpu.yaml"), ["margin=0.5", "optim.learning_rate=1e-4"])
    assert cfg.margin == 0.5 and cfg.optim.learning_rate == 1e-4


def test_unknown_key_raises_config_error():
    with pytest.raises(ConfigError, match="unknown key 'optim.lr'.*did you mean 'optim.learning_rate'"):
        cli.load_trainer_config("sft", str(REPO / "configs/sft_tiny_cpu.yaml"), ["optim.lr=3"])


def test_invalid_combination_names_the_key():
    with pytest.raises(ConfigError, match="num_micro_batches"):
        cli.load_trainer_config("sft", str(REPO / "configs/sft_tiny_cpu.yaml"), ["num_micro_batches=5"])


def test_main_unknown_key_clean_message_exit_2(capsys):
    rc = cli.main(["sft", str(REPO / "configs/sft_tiny_cpu.yaml"), "optim.lr=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unknown key 'optim.lr'" in err and "sft_tiny_cpu.yaml" in err


def test_main_missing_config_file(capsys, tmp_path):
    rc = cli.main(["rm", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "nope.yaml not found" in capsys.readouterr().err


def test_main_print_config(capsys):
    assert cli.main(["rm", str(REPO / "configs/rm_tiny_cpu.yaml"), "batch_size=4", "--print-config"]) == 0
    assert "batch_size: 4" in capsys.readouterr().out


def test_python_dash_m_entry_point_in_subprocess():
    out = subprocess.run([sys.executable, "-m", "rlhf_jax", "sft", "configs/sft_tiny_cpu.yaml", "data.max_seq_len=oops"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "data.max_seq_len" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_registered_commands():
    out = subprocess.run([sys.executable, "-m", "rlhf_jax", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for name in (*cli.TRAINERS, "demo"):
        assert name in out.stdout
