"""The train step: a pure function ``(state, frozen, batch) -> (state, metrics)``, jitted with explicit
in/out shardings and the state donated.

Gradient accumulation is a ``lax.scan`` over micro-batches. Micro-batch ``k`` takes global rows
``k, k+m, k+2m, ...`` (a strided split) so that every device's micro-batch rows are rows it already holds:
a contiguous split would move data between devices. Per-step randomness is ``fold_in(key(seed), step)``
(then ``fold_in(., micro_index)``), so a resumed run draws exactly the same numbers.

A stage's updates (``train.roles``) run in order inside the one step: each computes the gradient of its loss
for its own roles (the other roles are constants at their current weights, so a later update sees the new
weights of an earlier one), applies those roles' optimisers and EMAs, and the next update starts from the
result. A stage with several updates or repeats draws update application ``i``'s key as
``fold_in(step key, i)``; a single update keeps the step key itself (the numbers of a one-update stage are
those it always had).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from neodragon_jax.sharding import activate, batch_shardings
from train.optim import ema_update
from train.state import TrainSetup


def _split_micro(batch: Any, m: int, batch_sh: Any) -> Any:
    def one(x, sh):
        b = x.shape[0]
        if b % m:
            raise ValueError(f"global batch {b} is not divisible by train.micro_batches={m}")
        y = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
        spec = (None,) + tuple(sh.spec) + (None,) * (x.ndim - len(sh.spec))
        return jax.lax.with_sharding_constraint(y, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(one, batch, batch_sh)


def make_grad_fn(setup: TrainSetup, update=None) -> Callable:
    """``(params, model_state, frozen, batch, rng) -> (loss, metrics, grads)`` with micro-batch accumulation.

    ``update`` (default: the stage's first) says whose gradients: ``grads`` has one entry per role of the
    update; the other trained roles in ``params`` enter the loss as constants. ``loss`` is the mean over
    micro-batches of the update's loss (the sum of a dict loss), ``grads`` the mean of the micro-batch
    gradients: for a per-example-mean loss that equals the full-batch gradient.
    """
    stage, cfg = setup.stage, setup.cfg
    update = update or setup.updates[0]
    roles = update.roles
    m = cfg.train.micro_batches
    if m < 1:
        raise ValueError(f"train.micro_batches must be >= 1, got {m}")

    def single(params, model_state, frozen, batch, rng):
        frozen_modules = setup.frozen_modules(frozen)
        own = {n: params[n] for n in roles}

        def f(p):
            out, metrics = update.fn(setup.modules(dict(params, **p), model_state), frozen_modules, batch, rng)
            return out, metrics

        out, vjp_fn, metrics = jax.vjp(f, own, has_aux=True)
        if isinstance(out, dict):
            unknown = sorted(set(out) - set(own))
            if unknown:
                raise ValueError(f"stage {stage.name!r} returned losses for {unknown}, which are not the roles "
                                 f"{list(roles)} of update {update.label!r}")
            grads = {}
            for name in own:
                if name not in out:
                    grads[name] = jax.tree.map(jnp.zeros_like, own[name])
                    continue
                ct = {k: jnp.asarray(1.0 if k == name else 0.0, v.dtype) for k, v in out.items()}
                grads[name] = vjp_fn(ct)[0][name]
            metrics = dict(metrics, **{f"loss/{k}": v for k, v in out.items()})
            loss = sum(out.values())
        else:
            loss = out
            grads = vjp_fn(jnp.ones_like(out))[0]
        return loss.astype(jnp.float32), metrics, grads

    if m == 1:
        return single

    def accumulated(params, model_state, frozen, batch, rng):
        batch_sh = batch_shardings(batch, stage.batch_logical_axes(cfg), setup.rules, setup.mesh)
        micro = _split_micro(batch, m, batch_sh)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), {n: params[n] for n in roles})

        def body(carry, xs):
            i, mb = xs
            loss, metrics, grads = single(params, model_state, frozen, mb, jax.random.fold_in(rng, i))
            g_acc, l_acc, met_acc = carry
            g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
            met_acc = jax.tree.map(jnp.add, met_acc, metrics)
            return (g_acc, l_acc + loss, met_acc), None

        abstract = jax.eval_shape(lambda mb: single(params, model_state, frozen, mb, rng)[1],
                                  jax.tree.map(lambda x: x[0], micro))
        met0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        (g, loss, met), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), met0), (jnp.arange(m), micro))
        grads = jax.tree.map(lambda a, p: (a / m).astype(p.dtype), g, {n: params[n] for n in roles})
        return loss / m, jax.tree.map(lambda x: x / m, met), grads

    return accumulated


def step_rng(cfg, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(cfg.train.seed), step)


def make_train_step(setup: TrainSetup) -> Callable:
    """Unjitted pure step ``(state, frozen, batch) -> (new_state, metrics)``: the stage's updates in order."""
    updates = setup.updates
    grad_fns = [make_grad_fn(setup, u) for u in updates]
    cfg = setup.cfg
    n_apps = sum(u.repeat for u in updates)
    single = len(updates) == 1

    def train_step(state, frozen, batch):
        step = state["step"]
        rng = step_rng(cfg, step)
        params, opt_state, ema = dict(state["params"]), dict(state["opt_state"]), dict(state["ema"])
        out: dict = {}
        total = jnp.zeros((), jnp.float32)
        app = 0
        all_grads = {}
        for u, grad_fn in zip(updates, grad_fns):
            for r in range(u.repeat):
                key = rng if n_apps == 1 else jax.random.fold_in(rng, app)
                app += 1
                loss, metrics, grads = grad_fn(params, state["model_state"], frozen, batch, key)
                for name in u.roles:
                    upd, opt_state[name] = setup.txs[name].update(grads[name], opt_state[name], params[name])
                    params[name] = optax.apply_updates(params[name], upd)
                    if name in setup.ema_decays:
                        ema[name] = ema_update(ema[name], params[name], setup.ema_decays[name])
                all_grads.update(grads)
            # The metrics of an update are those of its last repeat.
            if single:
                out.update(metrics)
            else:
                out.update({f"{u.label}/{k}": v for k, v in metrics.items()})
                out[f"loss/{u.label}"] = loss
            total = total + loss
        many = len(setup.trainable) > 1
        for name in setup.trainable:
            suffix = f"/{name}" if many else ""
            out[f"grad_norm{suffix}"] = optax.tree.norm(all_grads[name])
            # The schedule's position is the optimiser's own update count (k a step for a role updated k times).
            out[f"lr{suffix}"] = jnp.asarray(setup.schedules[name](step * setup.plan.applications(name)), jnp.float32)
        out["loss"] = total
        if many:
            out["grad_norm"] = optax.tree.norm(all_grads)
        new_state = {
            "step": step + 1,
            "params": params,
            "model_state": state["model_state"],
            "opt_state": opt_state,
            "ema": ema,
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

    return train_step


def batch_sharding_tree(setup: TrainSetup, global_batch: int | None = None):
    gb = global_batch or setup.cfg.train.global_batch
    example = setup.stage.example_batch(setup.cfg, gb)
    return example, batch_shardings(example, setup.stage.batch_logical_axes(setup.cfg), setup.rules, setup.mesh)


def jit_train_step(setup: TrainSetup, global_batch: int | None = None):
    """``jax.jit`` of the step with explicit shardings; the state (argument 0) is donated."""
    _, batch_sh = batch_sharding_tree(setup, global_batch)
    fn = make_train_step(setup)
    return jax.jit(
        fn,
        in_shardings=(setup.state_shardings, setup.frozen_shardings, batch_sh),
        out_shardings=(setup.state_shardings, setup.replicated),
        donate_argnums=(0,),
    )


def jit_grad_fn(setup: TrainSetup, global_batch: int | None = None):
    """Jitted ``(state, frozen, batch) -> (loss, metrics, grads)`` of the stage's first update for the current
    step (parity tests)."""
    _, batch_sh = batch_sharding_tree(setup, global_batch)
    update = setup.updates[0]
    grad_fn = make_grad_fn(setup, update)

    def fn(state, frozen, batch):
        return grad_fn(state["params"], state["model_state"], frozen, batch, step_rng(setup.cfg, state["step"]))

    return jax.jit(
        fn,
        in_shardings=(setup.state_shardings, setup.frozen_shardings, batch_sh),
        out_shardings=(setup.replicated, setup.replicated,
                       {n: setup.state_shardings["params"][n] for n in update.roles}),
    )


def compile_step(setup: TrainSetup, global_batch: int | None = None):
    """Ahead-of-time lower + compile the step on abstract, sharded arguments (no allocation)."""
    example, batch_sh = batch_sharding_tree(setup, global_batch)
    abstract_batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), example, batch_sh)
    with activate(setup.mesh, setup.rules):
        lowered = jit_train_step(setup, global_batch).lower(setup.abstract_state, setup.abstract_frozen, abstract_batch)
        return lowered, lowered.compile()
