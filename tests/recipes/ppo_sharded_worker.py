"""Subprocess body of test_ppo_sharded: PPO on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices."""

import pathlib
import sys
import tempfile

import jax
import numpy as np

from rlhf_jax import fixtures, tasks
from rlhf_jax.config import load_config
from rlhf_jax.recipes import ppo

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # importlib mode: tests/compile_log.py
from compile_log import count_compiles  # noqa: E402


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    root = pathlib.Path(tempfile.mkdtemp(prefix="ppo_sharded_"))
    tok = fixtures.build_tokenizer(root / "tok")
    model = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=32, layers=2, heads=4,
                                      kv_heads=2, max_positions=128)
    data = tasks.write_task_data(root / "data", n_sft=32, n_pref=16, n_eval=16, n_prompts=32, seed=0)
    cfg = load_config(ppo.PPOConfig, None, [
        f"model.path={model}", f"data.path={data['prompts_train']}", "data.max_prompt_len=16",
        f"reward.model_path={model}", "reward.normalize=false", "reward.functions=['rlhf_jax.tasks:gold_score']",
        "frozen_dtype=bfloat16", "rollout.batch_size=8", "rollout.max_new_tokens=8", "ppo.epochs=1",
        "ppo.num_minibatches=2", f"run.output_dir={root / 'run'}", "run.total_steps=2", "run.tensorboard=false",
        "run.progress=off", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    with count_compiles() as compiles:
        result = ppo.train(cfg)
    pieces = {k: compiles[f"jit({k})"] for k in ("evaluate_rollout", "experience_fn", "update", "_generate_impl")}
    assert pieces == dict.fromkeys(pieces, 1), compiles
    actor = result["state"]["actor"].params
    emb = actor["embed"]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp"), emb.sharding.spec  # (vocab, embed) on the training mesh
    assert len(emb.sharding.device_set) == 8
    ref_emb = result["ref_params"]["embed"]
    assert ref_emb.dtype == np.dtype("bfloat16")
    for h in result["history"]:
        for k in ("score", "kl", "policy_loss", "value_loss", "entropy"):
            assert np.isfinite(h[k]), (k, h[k])
    print("PPO_SHARDED_OK", flush=True)


if __name__ == "__main__":
    sys.exit(main())
