"""Orbax checkpointing: retention policy, mismatch message, reshard-on-restore, torn writes ignored."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from neodragon_jax.config import load_config, to_json
from neodragon_jax.config.train_schema import CheckpointConfig
from neodragon_jax.convert.keymap import CheckpointMismatchError
from neodragon_jax.sharding import make_mesh
from train.checkpoint import Checkpointer

CFG_JSON = to_json(load_config("tiny"))


def _state(mesh, spec, hidden=16, scale=1.0):
    sh = NamedSharding(mesh, spec)
    rep = NamedSharding(mesh, P())
    w = jnp.arange(8 * hidden, dtype=jnp.float32).reshape(8, hidden) * scale
    return {
        "step": jax.device_put(jnp.int32(3), rep),
        "params": {"m": {"blocks": {0: {"kernel": jax.device_put(w, sh)}}, "bias": jax.device_put(jnp.ones(hidden), rep)}},
    }


def _target(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_keeps_latest_n_plus_every_k(tmp_path):
    mesh = make_mesh({"fsdp": 8})
    ck = Checkpointer(tmp_path, CheckpointConfig(every_steps=2, keep_latest=2, keep_every=4))
    state = _state(mesh, P("fsdp", None))
    for step in range(1, 11):
        ck.save(step, state, CFG_JSON, {"samples_seen": step})
    ck.wait()
    assert ck.all_steps() == [4, 8, 10]
    ck.close()


def test_kept_steps_are_saved_even_off_the_save_interval(tmp_path):
    mesh = make_mesh({"fsdp": 8})
    ck = Checkpointer(tmp_path, CheckpointConfig(every_steps=3, keep_latest=1, keep_every=5))
    state = _state(mesh, P("fsdp", None))
    for step in range(1, 12):
        ck.save(step, state, CFG_JSON, {"samples_seen": step})
    ck.wait()
    assert ck.all_steps() == [5, 10]  # saved 3, 5, 6, 9, 10; kept 5 and 10 (also the latest)
    ck.close()


def test_restore_reshards_onto_another_mesh(tmp_path):
    saved = _state(make_mesh({"fsdp": 8}), P("fsdp", None))
    ck = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    ck.save(5, saved, CFG_JSON, {"samples_seen": 40}, force=True)
    ck.close()
    other = make_mesh({"data": 2, "tensor": 4})
    target = _target(_state(other, P(None, "tensor")))
    restored, cfg, pos = Checkpointer(tmp_path, CheckpointConfig(), read_only=True).restore(None, target)
    k = restored["params"]["m"]["blocks"][0]["kernel"]
    assert k.sharding.spec == P(None, "tensor") and k.sharding.mesh.shape == other.shape
    np.testing.assert_array_equal(jax.device_get(k), jax.device_get(saved["params"]["m"]["blocks"][0]["kernel"]))
    assert pos == {"samples_seen": 40} and cfg["name"] == json.loads(CFG_JSON)["name"]


def test_mismatch_names_the_offending_keys(tmp_path):
    mesh = make_mesh({"fsdp": 8})
    ck = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    ck.save(1, _state(mesh, P("fsdp", None)), CFG_JSON, {}, force=True)
    ck.close()
    target = _target(_state(mesh, P("fsdp", None), hidden=32))
    target["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, P()))
    del target["params"]["m"]["bias"]
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(tmp_path, CheckpointConfig(), read_only=True).restore(1, target)
    msg = str(e.value)
    assert "params/extra" in msg and "missing" in msg
    assert "params/m/bias" in msg and "unexpected" in msg
    assert "params/m/blocks/0/kernel: checkpoint (8, 16), model expects (8, 32)" in msg


def test_torn_write_is_ignored(tmp_path):
    mesh = make_mesh({"fsdp": 8})
    ck = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    ck.save(2, _state(mesh, P("fsdp", None)), CFG_JSON, {"samples_seen": 2}, force=True)
    ck.close()
    # What a kill during an async save leaves behind: an unfinalised temporary directory.
    torn = tmp_path / "4.orbax-checkpoint-tmp"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "garbage").write_bytes(b"\0" * 10)
    ck2 = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    assert ck2.latest_step() == 2
    _, _, pos = ck2.restore(None, _target(_state(mesh, P("fsdp", None))))
    assert pos == {"samples_seen": 2}
    ck2.close()
