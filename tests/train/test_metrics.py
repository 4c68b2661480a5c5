"""MFU ingredients, the console line, the non-finite guard and the profiler window."""

import math

import jax
import jax.numpy as jnp
import pytest

from train.metrics import NonFiniteError, ProfileWindow, check_finite, compiled_flops, format_line, measure_peak_flops


def test_peak_flops_and_compiled_flops():
    peak = measure_peak_flops(n=128, iters=2)
    assert peak > 1e6
    c = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert compiled_flops(c) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_console_line_orders_and_formats():
    line = format_line(7, {"mae": 0.5, "mfu": 0.1234, "loss": 1.5, "step_time": 0.02, "tokens_per_s": 12345.0})
    assert line.startswith("step 7 | loss 1.5 | step_time 20.0ms | tokens_per_s 12,345.0 | mfu 12.34%")
    assert line.endswith("mae 0.5")


def test_non_finite_guard_names_step_and_checkpoint():
    check_finite(3, {"loss": 1.0, "grad_norm": 2.0, "mae": math.nan}, 2)  # only loss/grad norms are guarded
    with pytest.raises(NonFiniteError, match=r"step 3: \{'grad_norm': inf\}.*last good checkpoint is step 2"):
        check_finite(3, {"loss": 1.0, "grad_norm": math.inf}, 2)
    with pytest.raises(NonFiniteError, match="no checkpoint was saved yet"):
        check_finite(0, {"loss": math.nan}, None)


def test_profile_window_writes_a_trace(tmp_path):
    prof = ProfileWindow(tmp_path, start=1, num_steps=1)
    f = jax.jit(lambda x: x * 2)
    x = jnp.ones(4)
    for step in range(3):
        prof.before_step(step)
        x = f(x)
        prof.after_step(step, sync=x)
    prof.close()
    assert list(tmp_path.rglob("*.xplane.pb"))


def test_resumed_writer_drops_the_steps_it_will_replay(tmp_path):
    """A run killed after logging step 9 but checkpointed at 8 is resumed from 8: steps 8 and 9 must not end up
    twice in metrics.jsonl (issue 23 item 8)."""
    import json

    from train.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=False, enabled=True)
    for s in range(10):
        w.write(s, {"loss": float(s)}, console=False)
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # torn by the kill
    w = MetricsWriter(tmp_path, tensorboard=False, enabled=True, start_step=8)
    for s in (8, 9, 10):
        w.write(s, {"loss": 100.0 + s}, console=False)
    w.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(11))
    assert [r["loss"] for r in recs[7:]] == [7.0, 108.0, 109.0, 110.0]
