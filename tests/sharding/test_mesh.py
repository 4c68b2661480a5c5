"""Mesh construction from config: -1 axis, unknown axes and device-count mismatches give clear messages."""

import jax
import pytest

from neodragon_jax.config import ConfigError, load_config
from neodragon_jax.sharding import MeshError, make_abstract_mesh, make_mesh, parse_mesh_shape, resolve_mesh_shape


def test_mesh_from_dotted_overrides():
    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=4"])
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_minus_one_takes_the_rest():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    cfg = load_config("tiny", ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=2"])
    assert dict(make_mesh(cfg.mesh).shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_unknown_mesh_axis_message():
    with pytest.raises(ConfigError, match=r"unknown config key 'mesh.expert'.*mesh.data"):
        load_config("tiny", ["mesh.expert=2"])
    with pytest.raises(MeshError, match=r"unknown mesh axis 'expert'.*\['data', 'fsdp', 'tensor'\]"):
        parse_mesh_shape("data=2,expert=4")


def test_device_count_mismatch_message():
    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=3"])
    with pytest.raises(MeshError, match=r"needs 6 devices but 8 are available"):
        make_mesh(cfg.mesh)
    with pytest.raises(MeshError, match=r"does not divide the 8 devices"):
        resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match=r"only one mesh axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_dcn_split_must_divide_axis():
    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=4", "mesh.dcn_fsdp=3"])
    with pytest.raises(MeshError, match=r"'fsdp'=4 is not divisible by its DCN part mesh.dcn_fsdp=3"):
        make_mesh(cfg.mesh)


def test_abstract_mesh_needs_no_devices():
    am = make_abstract_mesh("data=4,fsdp=64")
    assert dict(am.shape) == {"data": 4, "fsdp": 64, "tensor": 1}
