"""Test-wide setup: hermetic Hugging Face caches, offline mode, float32 matmuls, shared fixtures."""

import os
import pathlib
import tempfile

_CACHE = tempfile.mkdtemp(prefix="rlhf_jax_hf_")
os.environ.setdefault("HF_HOME", _CACHE)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLHF_JAX_COMPILATION_CACHE", os.path.join(_CACHE, "xla"))  # hermetic, shared by subprocesses

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("RLHF_JAX_REAL_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """../shared/data (real public datasets); CI always has it."""
    assert SHARED_DATA.is_dir(), f"real data folder not found at {SHARED_DATA} (set RLHF_JAX_REAL_DATA)"
    return SHARED_DATA
