"""Run by test_layout.py in a subprocess with 8 simulated CPU devices (not collected by pytest).

For a (data, fsdp, tensor) mesh given on the command line, on a tiny Llama:
  * `reshard_for_inference` gives a copy in the inference layout, in new buffers, training params untouched;
  * the compiled sampler's decode `while` body has NO weight all-gather with the inference layout and DOES have
    them (the control) with the FSDP training layout;
  * both layouts give bit-identical rollouts for the same key;
  * the [out, in] decode copy (`models.to_out_in` into the inference layout) gives the same greedy rollout;
  * a sharded single-process prompt mask is still checked (global row numbers in the error).

  python tests/rollout/layout_worker.py 2,4,1 [2,2,2:scan ...]   (D,F,T[:scan] = nn.scan over layers)
"""

import json
import math
import os
import re
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hlo_loops (also when run from elsewhere)

import hlo_loops as H  # noqa: E402

from rlhf_jax import fixtures, models, rollout, sharding  # noqa: E402
from rlhf_jax.data.batching import pad_prompts
from rlhf_jax.rollout import decode  # noqa: E402

V = 120  # vocab, distinct from hidden 32, mlp 96, heads 4 x head_dim 8, kv 2 x 8: weight shapes are recognisable
GATHERS = ("all-gather", "all-gather-start")
COLLECTIVES = ("all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter",
               "reduce-scatter-start", "all-to-all", "all-to-all-start", "collective-permute",
               "collective-permute-start")


def tiny_model(scan: bool):
    config = models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=V, hidden=32, max_positions=128))
    return models.Transformer(config.replace(initializer_range=0.2, scan_layers=scan), head="lm")


def prompts():
    rows = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40], [50, 51, 52], [60] * 7, [70, 71], [80, 81, 82, 83]]
    return pad_prompts(rows, pad_token_id=0, buckets=(16,))


def decode_gathers(hlo: str, weight_sizes: set[int]) -> dict[str, list]:
    """Weight all-gathers of the sampler's program: inside the decode loop body ("body", per step), anywhere
    ("program"), and those XLA hoisted out of the loop ("hoisted": outside the body but traced in it)."""
    comps = H.parse_computations(hlo)
    # the decode loop: the top-level while traced at the sampler's top level (a scanned prefill is another one)
    loops = [w for w in H.top_level_whiles(comps) if re.search(r'op_name="[^"/]*/while"', w.instruction.attrs)]
    assert len(loops) == 1, [w.instruction.line[:200] for w in H.top_level_whiles(comps)]
    (entry,) = [c.name for c in comps.values() if c.entry]
    body = [c for c in H.collectives_in(comps, loops[0].body, GATHERS) if H.weight_like(c, weight_sizes)]
    program = [c for c in H.collectives_in(comps, entry, GATHERS) if H.weight_like(c, weight_sizes)]
    in_body = {c.instruction.name for c in body}
    in_decode = re.compile(r'op_name="[^"/]*/while/body/')  # traced in the decode loop (not in the prefill's scan)
    hoisted = [c for c in program if c.instruction.name not in in_body and in_decode.search(c.instruction.attrs)]
    every = H.collectives_in(comps, loops[0].body, COLLECTIVES)
    per_step = {op: sum(c.instruction.opcode.startswith(op) for c in every) for op in COLLECTIVES[::2]}
    return dict(body=body, program=program, hoisted=hoisted, per_step={k: v for k, v in per_step.items() if v})


def check_mesh(mesh_cfg: sharding.MeshConfig, *, scan: bool) -> dict:
    model = tiny_model(scan)
    params = models.init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh(mesh_cfg)
    train_sh = sharding.param_shardings(model, mesh)
    inf_sh = rollout.inference_layout(model, mesh)
    b_sh = sharding.batch_sharding(mesh)
    train_params = jax.device_put(params, train_sh)
    before = jax.tree.map(np.asarray, train_params)

    # --- reshard: new buffers, requested layout, training params untouched and still usable
    inf_params = rollout.reshard_for_inference(train_params, inf_sh)
    for a, b, sh in zip(jax.tree.leaves(train_params), jax.tree.leaves(inf_params), jax.tree.leaves(inf_sh)):
        assert b.sharding.is_equivalent_to(sh, a.ndim), (b.sharding, sh)
        assert not a.is_deleted()
        ptr_a = {s.device: s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
        assert all(ptr_a[s.device] != s.data.unsafe_buffer_pointer() for s in b.addressable_shards)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, inf_params), before)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, train_params), before)
    # no weight split over fsdp or data in the inference layout
    for sh in jax.tree.leaves(inf_sh):
        assert not {"fsdp", "data"} & set(jax.tree.leaves(tuple(sh.spec))), sh.spec
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    train_bytes, inf_bytes = rollout.bytes_per_device(train_params), rollout.bytes_per_device(inf_params)
    assert train_bytes < inf_bytes <= total
    if mesh_cfg.tensor == 1:
        assert inf_bytes == total

    ids, mask = prompts()
    kw = dict(max_new_tokens=6, eos_token_id=1, pad_token_id=0, temperature=1.0, batch_sharding=b_sh)
    # sizes of the weights the training layout splits over fsdp (what a weight all-gather would rebuild); scanned
    # [L, ...] layer weights may be gathered one layer at a time
    split = [x.shape for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(train_sh))
             if "fsdp" in jax.tree.leaves(tuple(sh.spec))]
    weight_sizes = {math.prod(shape) for shape in split}
    if scan:
        weight_sizes |= {math.prod(shape) // model.config.num_layers for shape in split if len(shape) >= 3}
    assert min(weight_sizes) >= 256, weight_sizes  # far above any decode activation of this test (<= 8 x 120)
    with sharding.mesh_context(mesh):
        hlo_train = rollout.lower_generate(model, train_params, ids, mask, key=jax.random.key(0),
                                           param_shardings=train_sh, **kw).compile().as_text()
        hlo_inf = rollout.lower_generate(model, inf_params, ids, mask, key=jax.random.key(0),
                                         param_shardings=inf_sh, **kw).compile().as_text()
        g_train, g_inf = decode_gathers(hlo_train, weight_sizes), decode_gathers(hlo_inf, weight_sizes)
        # inference layout: no weight all-gather in the decode loop, nor anywhere else in the program
        assert not g_inf["program"], [c.instruction.line[:300] for c in g_inf["program"]]
        # control (the check can see them): the FSDP layout gathers weights for the decode, per step in the body
        # (scanned layers: the gather depends on the layer index) or hoisted out of the loop by XLA's
        # loop-invariant code motion (unrolled layers on XLA:CPU), and the prefill gathers them once more
        assert g_train["body"] or g_train["hoisted"], "control: FSDP decode must all-gather weights"
        if scan:
            assert g_train["body"], "control: scanned FSDP layers must all-gather inside the decode loop"

        # --- same key, both layouts: bit-identical rollouts
        results = {}
        for name, p, sh in (("train", train_params, train_sh), ("inference", inf_params, inf_sh)):
            for seed, temp in ((0, 1.0), (1, 0.0)):
                ro = rollout.generate(model, p, ids, mask, key=jax.random.key(seed), param_shardings=sh,
                                      **{**kw, "temperature": temp})
                results[name, seed] = jax.tree.map(np.asarray, ro)
        # --- the [out, in] decode copy (`models.to_out_in`, what `rollout.weight_layout: out_in` samples from),
        # transposed and laid out for inference in one program: same greedy tokens, log-probs to float32 rounding
        t_model, t_params = models.to_out_in(model, train_params,
                                             shardings=lambda m: rollout.inference_layout(m, mesh))
        t_sh = rollout.inference_layout(t_model, mesh)
        for a, sh in zip(jax.tree.leaves(t_params), jax.tree.leaves(t_sh)):
            assert a.sharding.is_equivalent_to(sh, a.ndim), (a.sharding, sh)
        ro_t = jax.tree.map(np.asarray, rollout.generate(t_model, t_params, ids, mask, key=jax.random.key(1),
                                                         param_shardings=t_sh, **{**kw, "temperature": 0.0}))
        del t_params
        # the copy is what was sampled from; dropping it leaves the training params as they were
        del inf_params
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, train_params), before)
    for seed in (0, 1):
        a, b = results["train", seed], results["inference", seed]
        for f in ("response_ids_BxT", "response_mask_BxT", "logp_BxT", "sampling_logp_BxT"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{f} seed {seed}")
    assert results["train", 0].response_mask_BxT.sum() > 8  # something was sampled
    for f in ("response_ids_BxT", "response_mask_BxT"):
        np.testing.assert_array_equal(getattr(ro_t, f), getattr(results["train", 1], f), err_msg=f"out_in {f}")
    np.testing.assert_allclose(ro_t.logp_BxT, results["train", 1].logp_BxT, atol=1e-5, err_msg="out_in logp")

    # --- a sharded (fully addressable) bad mask is still caught, with global row numbers
    bad = mask.copy()
    bad[5] = 0
    bad_global = jax.device_put(bad, b_sh)
    for check in (lambda: decode._check_prompts(ids, bad_global), lambda: decode._check_addressable_rows(bad_global)):
        try:
            check()
        except ValueError as e:
            assert "rows [5] have no real token" in str(e), e
        else:
            raise AssertionError("bad mask not caught")
    counts = {f"{k}_{layout}": len(g[k]) for layout, g in (("train", g_train), ("inference", g_inf))
              for k in ("body", "program", "hoisted")}
    examples = sorted({f"{c.instruction.shape.split('{')[0]} {c.instruction.opcode}"
                       for c in g_train["body"] or g_train["hoisted"]})
    return dict(mesh=list(mesh_cfg.shape(jax.device_count())), scan_layers=scan, train_bytes=train_bytes,
                inference_bytes=inf_bytes, total_bytes=total, weight_all_gathers=counts,
                train_decode_gathers=examples, decode_body_collectives={"train": g_train["per_step"],
                                                                        "inference": g_inf["per_step"]})


def main(argv) -> None:
    assert jax.device_count() == 8, jax.devices()
    for case in argv or ["2,4,1"]:
        spec, _, variant = case.partition(":")
        rec = check_mesh(sharding.MeshConfig.parse(spec), scan=variant == "scan")
        print("LAYOUT_RESULT " + json.dumps(rec), flush=True)
    print("LAYOUT_OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
