"""LoRA in the model: the branch's math, the frozen base untouched, adapters off = base exactly, merge, sharding
axes, gradients over adapters only, and PEFT folders both ways checked with an independent `peft` install."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding as shd
from rlhf_jax.models import Transformer, load_pretrained, logical_specs, lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train import lora_load

from .hf_reference import hf_forward, make_hf_model, padded_batch
from .tiny import random_params

CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5, activation="silu"),
    "gpt2": dict(model_type="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5, activation="gelu_new",
                 qkv_bias=True, o_bias=True, mlp_bias=True),
}
SPEC = lora.LoRAConfig(rank=4, alpha=8.0, targets=("all",)).spec()


def _models(family, *, scan=False, head="lm"):
    c = ModelConfig(**CONFIGS[family], scan_layers=scan)
    base = Transformer(c, head=head)
    with_lora = Transformer(c.replace(lora=SPEC), head=head)
    p = random_params(base)
    adapters = lora.adapter_part(random_params(with_lora, seed=2))  # B random too: the branch is live
    return base, with_lora, p, lora.join(adapters, p)


def _ids():
    ids = np.arange(20).reshape(2, 10) % 64
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_branch_is_scaled_low_rank_product_and_adapters_off_is_base_exactly(family):
    base, m, p, full = _models(family)
    ids, mask = _ids()
    y_base = base.apply({"params": p}, ids, mask)
    # adapters off (B = 0): bit-identical to the model without LoRA
    assert bool(jnp.all(m.apply({"params": lora.adapters_off(full)}, ids, mask) == y_base))
    y = m.apply({"params": full}, ids, mask)
    assert float(jnp.abs(y - y_base).max()) > 1e-2  # the branch does something
    # the merged weights W + (alpha/r) A B give the same function as base + branch
    np.testing.assert_allclose(base.apply({"params": lora.merged(full, SPEC)}, ids, mask), y, atol=2e-5)


def test_one_projection_by_hand():
    """y = x W + (alpha/r) (x A) B on the q projection of layer 0, computed with numpy."""
    base, m, p, full = _models("llama")
    x = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    att = full["layers_0"]["attn"]
    w, a, b = (np.asarray(att[k]) for k in ("q", "q_lora_a", "q_lora_b"))
    want = x @ w.reshape(32, -1) + (8.0 / 4) * (x @ a) @ b.reshape(4, -1)

    from rlhf_jax.models.transformer import dense

    import flax.linen as nn

    class One(nn.Module):
        config: ModelConfig

        @nn.compact
        def __call__(self, x):
            wq = self.param("q", nn.initializers.zeros, (32, 4, 8))
            return dense(self, "q", x, wq, 1, ("embed", "q_heads", "head_dim"))

    one = One(m.config)
    got = one.apply({"params": {"q": w, "q_lora_a": a, "q_lora_b": b}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), want, rtol=1e-5, atol=1e-5)


def test_no_lora_tree_is_unchanged_by_every_helper():
    base, _, p, _ = _models("llama")
    assert not lora.has_adapters(p)
    assert lora.split_trainable(p) == (p, None) and lora.trainable(p) is p
    assert lora.adapters_off(p) == p and lora.cast_frozen(p, jnp.bfloat16) is p


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_trainable_is_adapters_plus_scalar_head_and_join_inverts_split(head):
    _, m, _, full = _models("llama", head=head)
    train, frozen = lora.split_trainable(full)
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(train)}
    assert names and all("_lora_" in n or n == "['score']" for n in names)
    assert ("['score']" in names) == (head == "scalar")
    assert not any("_lora_" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(frozen))
    assert jax.tree.structure(lora.join(train, frozen)) == jax.tree.structure(full)
    cast = lora.cast_frozen(full, jnp.bfloat16)
    assert cast["layers_0"]["attn"]["q"].dtype == jnp.bfloat16
    assert cast["layers_0"]["attn"]["q_lora_a"].dtype == jnp.float32


def test_gradient_covers_adapters_only_and_equals_full_gradient_there():
    _, m, _, full = _models("llama")
    ids, mask = _ids()

    def loss(params):
        return jnp.sum(m.apply({"params": params}, ids, mask) ** 2) * 1e-3

    value, g = lora.value_and_grad(loss)(full)
    value_full, g_full = jax.value_and_grad(loss)(full)
    assert jax.tree.structure(g) == jax.tree.structure(lora.trainable(full))
    np.testing.assert_allclose(value, value_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(lora.trainable(g_full)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_carry_the_logical_axes_of_their_weight(scan):
    _, m, _, _ = _models("llama", scan=scan)
    specs = logical_specs(m)
    att = (specs["layers"] if scan else specs["layers_0"])["attn"]
    lead = ("layers",) if scan else ()
    assert tuple(att["q_lora_a"]) == (*lead, "embed", None)
    assert tuple(att["q_lora_b"]) == (*lead, None, "q_heads", "head_dim")
    assert tuple(att["o_lora_a"]) == (*lead, "q_heads", "head_dim", None)
    assert tuple(att["o_lora_b"]) == (*lead, None, "embed")


def test_scanned_merge_matches_unscanned():
    base, m, p, full = _models("llama", scan=True)
    ids, mask = _ids()
    np.testing.assert_allclose(base.apply({"params": lora.merged(full, SPEC)}, ids, mask),
                               m.apply({"params": full}, ids, mask), atol=2e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_export_written_layer_by_layer_equals_the_whole_merge(scan, tmp_path):
    """The export merges each adapted weight one layer at a time as it is written (`lora.MergedWeight`, so
    no whole merged copy of the base is held): the files equal `save_pretrained` of `lora.merged`."""
    import safetensors.numpy

    from rlhf_jax.models import save_pretrained

    base, m, p, full = _models("llama", scan=scan)
    eager = jax.tree.map(lambda x: x.astype(jnp.float32), lora.merged(full, SPEC))
    lazy = lora.merged_lazily(full, SPEC, jnp.float32)
    assert any(isinstance(x, lora.MergedWeight) for x in jax.tree.leaves(lazy))
    save_pretrained(tmp_path / "eager", base, eager)
    save_pretrained(tmp_path / "lazy", base, lazy)
    a = safetensors.numpy.load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = safetensors.numpy.load_file(str(tmp_path / "lazy" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ PEFT
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _attached(d, targets, *, scan=False, seed=0):
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1))
    model, params = load_pretrained(d, scan_layers=scan, shardings=lambda m_: shd.param_shardings(m_, mesh))
    cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=targets, seed=seed)
    lmodel, full = lora_load.attach_adapters(model, params, cfg, mesh=mesh, rules=shd.LOGICAL_RULES,
                                             param_dtype=jnp.float32)
    # make B non-zero (fresh adapters are the base model exactly)
    rng = np.random.default_rng(seed + 1)
    full = jax.tree_util.tree_map_with_path(
        lambda k, x: x + 0.2 * jnp.asarray(rng.normal(size=x.shape), x.dtype)
        if str(k[-1].key).endswith("_lora_b") else x, full)
    return lmodel, full, cfg


@pytest.mark.parametrize("family,targets", [("llama", ("all",)), ("gpt2", ("c_attn", "c_proj", "c_fc")),
                                            ("llama", ("q_proj", "v_proj")), ("llama", ("all", "lm_head"))])
def test_peft_export_loads_in_peft_with_equal_logits(family, targets, tmp_path):
    d = tmp_path / "base"
    hf = make_hf_model(family, d)
    lmodel, full, _ = _attached(d, targets, scan=family == "gpt2")
    out = lora_load.save_peft(tmp_path / "adapter", lmodel, full, base_path=str(d))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    ids, mask = padded_batch()
    ours = np.asarray(lmodel.apply({"params": full}, ids, mask))
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval(),
                                           str(out)).eval()
    theirs = hf_forward(model, ids, mask)
    assert np.abs(ours - theirs)[mask == 1].max() <= 1e-4
    assert np.abs(ours - hf_forward(hf, ids, mask))[mask == 1].max() > 1e-2  # the adapters matter
    if family == "llama":  # and our own loader reads the folder back exactly
        fresh, other, _ = _attached(d, targets, seed=7)
        back = lora_load.load_peft_adapters(out, fresh, lora.adapter_part(other))
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora.adapter_part(full)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]),
                                            ("gpt2", ["c_attn", "c_proj", "c_fc"]), ("llama", ["v_proj", "lm_head"])])
def test_peft_made_adapter_folder_loads_as_starting_point(family, targets, tmp_path):
    """A folder written by PEFT itself (random B) loads into our model with PEFT's logits."""
    d = tmp_path / "base"
    make_hf_model(family, d)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  fan_in_fan_out=family == "gpt2"))
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)  # lm_head: no copy of its base weight
    ids, mask = padded_batch(seed=3)
    theirs = hf_forward(pm.eval(), ids, mask)
    lmodel, full, _ = _attached(d, tuple(targets))
    loaded = lora_load.load_peft_adapters(tmp_path / "adapter", lmodel, lora.adapter_part(full))
    ours = np.asarray(lmodel.apply({"params": lora.join(loaded, full)}, ids, mask))
    assert np.abs(ours - theirs)[mask == 1].max() <= 1e-4


def test_peft_folder_with_other_rank_is_refused(tmp_path):
    d = tmp_path / "base"
    make_hf_model("llama", d)
    lmodel, full, _ = _attached(d, ("q_proj",))
    out = lora_load.save_peft(tmp_path / "adapter", lmodel, full, base_path=str(d))
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(ValueError, match="adapter_config.json: r=8"):
        lora_load.load_peft_adapters(out, lmodel, lora.adapter_part(full))


@pytest.mark.parametrize("scan", [False, True])
def test_lm_head_target_adapts_the_untied_output_layer(scan):
    """Target ``lm_head``: an adapter on the output layer (top level, never scanned: A's init bound is
    1/sqrt(hidden) on a scanned model too), merged = base + branch; a tied output layer is refused."""
    from rlhf_jax.models import init_params

    spec = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "lm_head")).spec()
    c = ModelConfig(**CONFIGS["llama"], scan_layers=scan)
    base, m = Transformer(c), Transformer(c.replace(lora=spec))
    specs = logical_specs(m)
    assert tuple(specs["lm_head_lora_a"]) == ("embed", None) and tuple(specs["lm_head_lora_b"]) == (None, "vocab")
    a = lora.init_adapters(jax.eval_shape(lambda: init_params(m, jax.random.key(0))), jax.random.key(1),
                           scanned=scan)["lm_head_lora_a"]
    assert a.shape == (32, 4) and 0.5 * 32 ** -0.5 < float(jnp.abs(a).max()) <= 32 ** -0.5
    p = random_params(base)
    full = lora.join(lora.adapter_part(random_params(m, seed=2)), p)
    ids, mask = _ids()
    out = m.apply({"params": full}, ids, mask)
    np.testing.assert_allclose(base.apply({"params": lora.merged(full, spec)}, ids, mask), out, atol=2e-5)
    assert float(jnp.abs(out - base.apply({"params": p}, ids, mask)).max()) > 1e-3  # the head's branch is live
    with pytest.raises(ValueError, match="lm_head needs an untied output layer"):
        tied = ModelConfig(**CONFIGS["llama"], tie_word_embeddings=True, lora=spec)
        init_params(Transformer(tied), jax.random.key(0))
