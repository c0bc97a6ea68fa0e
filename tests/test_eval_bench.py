"""benchmarks/eval.py's decode-products floor: the weight matrices a decode step streams, in either layout,
scanned or not, tied head or not (no timing assertions: the machine is shared)."""

import pathlib
import sys
import types

import jax
import numpy as np
import pytest

from rlhf_jax import fixtures, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.eval import decode_weights, products_floor  # noqa: E402


def _model(*, scan: bool, tie: bool):
    cfg = models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=96, hidden=32, max_positions=64,
                                                          tie_word_embeddings=tie))
    model = models.Transformer(cfg.replace(scan_layers=scan), head="lm")
    return model, models.init_params(model, jax.random.key(0))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_decode_weights_are_the_steps_matrices_in_either_layout(scan, tie):
    model, params = _model(scan=scan, tie=tie)
    c = model.config
    mats = decode_weights(params, model)
    assert len(mats) == c.num_layers * 7 + 1  # q k v o gate up down per layer, then the head
    assert {m.ndim for m in mats} == {2}
    head = mats[-1]
    assert head.shape == (c.hidden_size, c.vocab_size)  # [in, out]
    if tie:
        np.testing.assert_array_equal(head, params["embed"].T)
    copy_model, copy_params = models.to_out_in(model, params)
    flipped = decode_weights(copy_params, copy_model)
    assert len(flipped) == len(mats)
    for a, b in zip(mats, flipped):  # the same matrices, each stored transposed
        np.testing.assert_array_equal(np.asarray(a).T, np.asarray(b))
    total = sum(m.size for m in mats)
    assert total == sum(m.size for m in flipped) > 0


def test_products_floor_reports_every_field():
    model, params = _model(scan=False, tie=False)
    floor = products_floor(types.SimpleNamespace(model=model, params=params), batch=4, steps=10)
    assert floor["layout"] == "in_out" and floor["steps"] == 10
    assert floor["products_s"] == pytest.approx(10 * floor["step_products_s"])
    expected_gb = sum(m.size * 4 for m in decode_weights(params, model)) / 1e9
    assert floor["weight_gb"] == pytest.approx(expected_gb)
    assert all(np.isfinite(floor[k]) and floor[k] > 0 for k in ("products_gbs", "read_gbs", "bandwidth_floor_s"))
