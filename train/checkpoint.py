"""Orbax checkpoints of the train state, the resolved config and the input-pipeline position.

One ``ocp.CheckpointManager`` with three items per step: ``state`` (``StandardSave`` of the trained state
only; frozen models are never written), ``config`` (the resolved config as JSON) and ``data_iter`` (the
data iterator's small JSON position). Saves are asynchronous (device->host copy happens before ``save``
returns, so the next step may donate the buffers) and atomic: orbax writes into a temporary directory and
renames it when complete, so a process killed at any moment leaves the previous complete checkpoint
usable, and half-written temporaries are ignored and cleaned up on the next start. Retention is orbax's
preservation policies: the latest ``keep_latest`` plus every step divisible by ``keep_every``.

Restore goes into the abstract sharded target (``TrainSetup.abstract_state``), so a run can resume on a
different mesh: orbax reads each array straight into the new shardings. The saved tree is compared with
the target first, and a mismatch raises :class:`CheckpointMismatchError` naming the offending keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from neodragon_jax.config.train_schema import CheckpointConfig
from neodragon_jax.convert.keymap import CheckpointMismatchError

log = logging.getLogger(__name__)

ITEMS = ("state", "config", "data_iter")


def _key_str(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params/student/proj_in/kernel": (shape, dtype)}`` for every array leaf of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        out["/".join(_key_str(k) for k in path)] = (tuple(shape), str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else "")
    return out


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` for the engine's three items."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        if cfg.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {cfg.every_steps}")
        keep: list = [cm.LatestN(n=max(1, cfg.keep_latest))]
        if cfg.keep_every > 0:
            keep.append(cm.EveryNSteps(interval_steps=cfg.keep_every))
        save: list = [cm.FixedIntervalPolicy(cfg.every_steps)]
        if cfg.keep_every > 0:
            # A kept step is also saved: with every_steps=450 and keep_every=1500 nothing was ever kept
            # before step 4500 (the first common multiple).
            save.append(cm.FixedIntervalPolicy(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(save),
            preservation_policy=cm.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front so a fresh manager can read item metadata before any save/restore.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data_iter": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, config_json: str, data_state: dict, *, force: bool = False) -> bool:
        """Start an async save of ``state`` at ``step`` (if the interval policy or ``force`` says so)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(json.loads(config_json)),
                data_iter=ocp.args.JsonSave(data_state),
            ),
            force=force,
        )

    def check_compatible(self, step: int, target: Any) -> None:
        """Compare the saved ``state`` tree with ``target``; raise naming missing/unexpected/mis-shaped keys."""
        meta = self.manager.item_metadata(step)
        saved_tree = meta["state"] if meta is not None else None
        if saved_tree is None:
            raise FileNotFoundError(f"checkpoint {self.directory}/{step} has no readable 'state' item")
        saved = flat_shapes(getattr(saved_tree, "tree", saved_tree))
        want = flat_shapes(target)
        missing = sorted(set(want) - set(saved))
        unexpected = sorted(set(saved) - set(want))
        misshaped = [(k, saved[k][0], want[k][0]) for k in sorted(set(saved) & set(want)) if saved[k][0] != want[k][0]]
        if missing or unexpected or misshaped:
            # Optimizer moments and the EMA mirror the parameters: name the parameter keys when they differ.
            models = ("params/", "model_state/", "step")
            if any(k.startswith(models) for k in missing + unexpected + [m[0] for m in misshaped]):
                missing = [k for k in missing if k.startswith(models)]
                unexpected = [k for k in unexpected if k.startswith(models)]
                misshaped = [m for m in misshaped if m[0].startswith(models)]
            raise CheckpointMismatchError(
                f"train state at {self.directory}/{step}", missing=missing, unexpected=unexpected, misshaped=misshaped
            )

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict, dict]:
        """Restore ``(state, config dict, data position)`` at ``step`` (None = latest) into ``target``.

        ``target`` is a ``ShapeDtypeStruct`` tree with shardings (``TrainSetup.abstract_state``).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        self.check_compatible(step, target)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                config=ocp.args.JsonRestore(),
                data_iter=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["config"], out["data_iter"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
