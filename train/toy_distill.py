"""``toy_distill``: the smallest stage with roles, and the example to copy when adding a stage.

A frozen teacher MLP and a shallower student trained against it by two updates in order (match the
teacher, then fit the data), on the ``toy`` stage's synthetic data. Each role's depth is a config field
(``model.mmdit.num_layers``, read by the builder), so the roles' ``overrides`` give them different depths
the way a 24-block teacher and an 18-block student differ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from train.roles import Frozen, RoleStage, Trained, Update
from train.stages import ToyMLP, ToyStage


@dataclasses.dataclass(frozen=True)
class ToyDistillSettings:
    teacher_depth: int = 3
    student_depth: int = 1
    order: tuple[str, ...] = ("distill", "fit")  # the student's updates within one step, in order
    student_lr: float = 3e-2
    student_ema: float = 0.5
    teacher_init: str = "random"  # weight sources (train/weights.py)
    student_init: str = "random"


class ToyDistill(RoleStage, ToyStage):
    name = "toy_distill"
    settings_class = ToyDistillSettings

    def __init__(self, cfg, **kw):
        super().__init__(cfg, dim=8, hidden=16, **kw)
        self.settings = cfg.stages.get_settings(self.name)
        self.losses = {"distill": self.distill_loss, "fit": self.fit_loss}
        bad = [n for n in self.settings.order if n not in self.losses]
        if bad or not self.settings.order:
            raise ValueError(f"stages.toy_distill.order {list(self.settings.order)}: updates are {list(self.losses)}")

    def _mlp(self, cfg, rngs):
        return ToyMLP(self.dim, self.hidden, cfg.model.mmdit.num_layers, rngs=rngs)

    def roles(self, cfg):
        s = self.settings
        return {"teacher": Frozen(self._mlp, overrides=(f"model.mmdit.num_layers={s.teacher_depth}",),
                                  init=s.teacher_init),
                "student": Trained(self._mlp, overrides=(f"model.mmdit.num_layers={s.student_depth}",),
                                   init=s.student_init, optim={"lr": s.student_lr}, ema=s.student_ema)}

    def updates(self, cfg):
        return [Update(("student",), self.losses[n], name=n) for n in self.settings.order]

    def distill_loss(self, m, batch, rng):
        x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)  # the teacher is a constant
        return jnp.mean(jnp.square(m.student(x) - m.teacher(x))), {}

    def fit_loss(self, m, batch, rng):
        err = m.student(batch["x"]) - batch["y"]
        return jnp.mean(jnp.square(err)), {"mae": jnp.mean(jnp.abs(err))}
