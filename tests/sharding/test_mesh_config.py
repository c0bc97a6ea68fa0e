"""MeshConfig, rules validation and single-device behaviour of rlhf_jax.sharding (in process, 1 device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding as shd


class TestMeshConfig:
    @pytest.mark.parametrize("cfg,n,shape", [(shd.MeshConfig(), 8, (8, 1, 1)), (shd.MeshConfig(data=2, fsdp=-1), 8, (2, 4, 1)),
                                             (shd.MeshConfig(1, 1, -1), 4, (1, 1, 4)), (shd.MeshConfig(2, 2, 2), 8, (2, 2, 2))])
    def test_shape_resolves_the_rest(self, cfg, n, shape):
        assert cfg.shape(n) == shape

    @pytest.mark.parametrize("kw,msg", [({"data": 0}, "mesh.data must be a positive int or -1"),
                                        ({"tensor": 1.5}, "mesh.tensor must be"),
                                        ({"fsdp": True}, "mesh.fsdp must be"),
                                        ({"data": -1, "fsdp": -1}, r"at most one .* -1 for \['data', 'fsdp'\]")])
    def test_invalid_values_name_the_key(self, kw, msg):
        with pytest.raises(ValueError, match=msg):
            shd.MeshConfig(**kw)

    def test_sizes_must_match_devices(self):
        with pytest.raises(ValueError, match="mesh.data=-1: 6 devices not divisible by the other axes' product 4"):
            shd.MeshConfig(data=-1, fsdp=4).shape(6)
        with pytest.raises(ValueError, match="has 4 devices, but 8 are available"):
            shd.MeshConfig(2, 2, 1).shape(8)

    def test_from_dict_and_parse(self):
        assert shd.MeshConfig.from_dict({"fsdp": 4, "data": 1}) == shd.MeshConfig(1, 4, 1)
        with pytest.raises(ValueError, match=r"unknown mesh key\(s\) \['model'\]"):
            shd.MeshConfig.from_dict({"model": 2})
        assert shd.MeshConfig.parse("2,2,2") == shd.MeshConfig.parse("2x2x2") == shd.MeshConfig(2, 2, 2)
        assert shd.MeshConfig.parse("data=-1,tensor=2") == shd.MeshConfig(-1, 1, 2)
        with pytest.raises(ValueError, match="bad mesh spec '2,2'"):
            shd.MeshConfig.parse("2,2")


class TestRules:
    def test_default_tables_are_valid_and_inference_drops_fsdp(self):
        t = shd.validate_rules(shd.LOGICAL_RULES)
        assert t["embed"] == ("fsdp",) and t["batch"] == ("data", "fsdp") and t["mlp"] == ("tensor",)
        i = shd.validate_rules(shd.INFERENCE_RULES)
        assert i["embed"] == () and i["mlp"] == ("tensor",)

    def test_duplicate_and_unknown_axes_rejected(self):
        with pytest.raises(ValueError, match="'embed' has more than one sharding rule"):
            shd.validate_rules((("embed", "fsdp"), ("embed", None)))
        with pytest.raises(ValueError, match=r"rule for 'embed' names unknown mesh axes \['model'\]"):
            shd.validate_rules((("embed", "model"),))

    def test_one_mesh_axis_used_twice_in_a_spec_is_an_error(self):
        mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
        with pytest.raises(ValueError, match=r"\['w'\]: mesh axes \['tensor'\] used by two dims"):
            shd.logical_to_shardings({"w": P("mlp", "vocab")}, mesh)

    def test_single_device_mesh_and_batch(self):
        mesh = shd.make_mesh(shd.MeshConfig(-1, 1, 1), jax.devices()[:1])
        sh = shd.logical_to_shardings({"w": P("embed", "mlp")}, mesh,
                                      shapes={"w": jax.ShapeDtypeStruct((3, 5), jnp.float32)})
        assert sh["w"].spec == P("fsdp", "tensor")
        assert shd.host_data_shard(mesh) == (0, 1)
        b = shd.shard_batch({"x": np.arange(6).reshape(3, 2)}, mesh)
        np.testing.assert_array_equal(np.asarray(b["x"]), np.arange(6).reshape(3, 2))
        with shd.mesh_context(mesh):
            assert jax.sharding.get_abstract_mesh().axis_names == shd.MESH_AXES
