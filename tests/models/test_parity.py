"""Logit parity with Hugging Face PyTorch models (float32, highest matmul precision set in conftest)."""

import numpy as np
import pytest

from rlhf_jax.models import load_pretrained, save_pretrained

from .hf_reference import FAMILIES, hf_forward, make_hf_model, padded_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def last_real_index(mask_BxS):
    return mask_BxS.shape[1] - 1 - np.argmax(mask_BxS[:, ::-1], axis=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(family, head)` -> (dir, torch model): each tiny HF model is built and saved once."""
    built = {}

    def get(family, head="lm"):
        if (family, head) not in built:
            d = tmp_path_factory.mktemp(f"{family}-{head}")
            built[family, head] = d, make_hf_model(family, d, head=head)
        return built[family, head]

    return get


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm_case(request, checkpoint):
    return (request.param, *checkpoint(request.param))


def test_load_matches_hf_logits_with_left_and_right_padding(lm_case):
    family, d, hf = lm_case
    ids, mask = padded_batch()
    ref = hf_forward(hf, ids, mask)
    model, params = load_pretrained(d)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    assert ours.shape == ref.shape == (3, 10, 97)
    err = np.abs(ours - ref)[mask == 1].max()
    assert err <= TOL, f"{family}: max |Δlogits| = {err}"


def test_save_pretrained_loads_in_transformers_with_same_logits(lm_case, tmp_path):
    family, d, hf = lm_case
    ids, mask = padded_batch(seed=1)
    model, params = load_pretrained(d, scan_layers=True)  # also exercises the scanned layout on save
    out = save_pretrained(tmp_path / "saved", model, params)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    err = np.abs(hf_forward(hf2, ids, mask) - hf_forward(hf, ids, mask))[mask == 1].max()
    assert err <= TOL, f"{family}: max |Δlogits| after save = {err}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_scalar_head_matches_sequence_classification(family, checkpoint, tmp_path):
    d, hf = checkpoint(family, "scalar")
    ids, mask = padded_batch(seed=2)
    ref_B = hf_forward(hf, ids, mask)[:, 0]  # HF pools the last non-pad token (pad_token_id = 0)
    model, params = load_pretrained(d, head="scalar")
    scores_BxS = model.apply({"params": params}, ids, mask)
    assert scores_BxS.shape == (3, 10) and scores_BxS.dtype == np.float32
    ours_B = np.asarray(scores_BxS)[np.arange(3), last_real_index(mask)]
    np.testing.assert_allclose(ours_B, ref_B, atol=TOL)

    save_pretrained(tmp_path / "out", model, params)
    hf2 = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert hf2.config.pad_token_id == 0
    np.testing.assert_allclose(hf_forward(hf2, ids, mask)[:, 0], ref_B, atol=TOL)


def test_scalar_head_on_causal_lm_checkpoint_starts_at_zero(checkpoint):
    d, _ = checkpoint("llama")
    model, params = load_pretrained(d, head="scalar")
    assert "lm_head" not in params and params["score"].shape == (32, 1)
    ids, mask = padded_batch()
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, ids, mask)), 0.0)


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    _, hf = checkpoint("qwen2")
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")  # the same torch model, split into files
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids, mask = padded_batch()
    model, params = load_pretrained(tmp_path)
    err = np.abs(np.asarray(model.apply({"params": params}, ids, mask)) - hf_forward(hf, ids, mask))[mask == 1]
    assert err.max() <= TOL

    save_pretrained(tmp_path / "out", model, params, max_shard_size="20KB")
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    err2 = np.abs(hf_forward(hf2, ids, mask) - hf_forward(hf, ids, mask))[mask == 1]
    assert err2.max() <= TOL
