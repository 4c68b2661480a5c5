"""Recipes: phases declared as data, each cached under a key that is a digest of what it computes from.

A :class:`Phase` is a name, what it runs (a registered training stage, or a job function), its settings, how
its config is made from the recipe's base config and its inputs' results (``configure``), and its inputs
(earlier phases by name). :func:`run_recipe` runs the phases in order, each in ``<workdir>/<name>/``:

* its **key** is a digest of the phase's resolved config (for a job: only the config keys it declares in
  ``uses``; for a training phase: the whole config with the stage's settings in force, less the keys that
  only say where and how a run is laid out, :data:`VOLATILE`), its settings, and its inputs' keys. Paths
  under the workdir are written relative to it, so a moved workdir keeps its keys;
* a finished phase (``DONE.json`` with the same key) is **reused**; an interrupted one (``PHASE.json`` with
  the same key, no ``DONE.json``) **resumes** (a training phase from its last checkpoint; a job is called
  with ``ctx.resumed`` and picks up its own partial output); a phase whose key changed is **rebuilt** (its
  folder cleared) after a line that names every differing key, and so is every phase after it that takes
  it as an input (their keys hold its key).

A key never depends on a hand-picked list: a ``--set`` that reaches a phase's resolved config changes its
key, and one that the phase overwrites (or does not read) does not. The demo's phases map onto it as
``data`` (job), ``vae`` (train ``vae`` + a job-like ``after`` measuring the latent normalisation),
``latents`` (job), ``flow`` (train ``flow``), ``samples`` and ``eval`` (jobs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from neodragon_jax.config import Config, to_dict

#: Config keys (dotted prefixes) that do not change what a training phase computes: where its files go, how
#: often it logs or checkpoints, profiling, the device mesh (a run resumes onto another mesh with the same
#: numbers up to float reassociation), and how records are read.
VOLATILE = ("name", "train.output_dir", "train.log_every", "train.tensorboard", "train.profile_start",
            "train.profile_steps", "train.peak_flops", "checkpoint", "mesh", "data.in_memory")

DONE, STARTED = "DONE.json", "PHASE.json"


class RecipeError(ValueError):
    """A recipe that cannot run (unknown input, repeated phase name, a changed phase under ``on_change='refuse'``)."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase. ``run``: a stage name (a training phase) or ``fn(ctx) -> results dict`` (a job).

    ``configure(base_cfg, inputs, settings) -> Config``: the phase's config (default: the base config). ``settings``:
    a dataclass or dict that enters the key and reaches ``ctx.settings``. ``uses``: the dotted config keys
    the phase reads (the key's config part); None = the whole resolved config less :data:`VOLATILE` (the
    default for training phases), ``()`` = none (the default for jobs). Training phases only:
    ``make_stage(cfg, ctx)`` builds the stage (default ``get_stage(run, cfg)``); ``after(ctx, result)`` runs
    once training is complete and returns more results (e.g. statistics of the trained model).
    """

    name: str
    run: str | Callable[["PhaseContext"], Mapping[str, Any]]
    settings: Any = None
    inputs: tuple[str, ...] = ()
    configure: Callable[[Config, Mapping[str, "PhaseRecord"], Any], Config] | None = None
    uses: tuple[str, ...] | None = None
    make_stage: Callable[[Config, "PhaseContext"], Any] | None = None
    after: Callable[["PhaseContext", Any], Mapping[str, Any]] | None = None

    @property
    def is_train(self) -> bool:
        return isinstance(self.run, str)


def TrainPhase(name: str, stage: str, *, inputs: Sequence[str] = (), settings: Any = None, configure=None,
               uses: Sequence[str] | None = None, make_stage=None, after=None) -> Phase:
    return Phase(name, stage, settings, tuple(inputs), configure, None if uses is None else tuple(uses),
                 make_stage, after)


def JobPhase(name: str, fn: Callable[["PhaseContext"], Mapping[str, Any]], *, inputs: Sequence[str] = (),
             settings: Any = None, configure=None, uses: Sequence[str] = ()) -> Phase:
    return Phase(name, fn, settings, tuple(inputs), configure, tuple(uses))


@dataclasses.dataclass
class PhaseRecord:
    """A phase's outcome: its folder, key, results and how this run got them."""

    name: str
    dir: Path
    key: str
    results: dict
    status: str  # "reused" | "ran" | "resumed" | "rebuilt"
    seconds: float
    cfg: Config | None = None
    stage: Any = None  # training phases: the stage object (to restore its trained modules)


@dataclasses.dataclass
class PhaseContext:
    name: str
    dir: Path
    workdir: Path
    cfg: Config
    settings: Any
    inputs: dict[str, PhaseRecord]
    resumed: bool
    say: Callable[[str], None]
    stage: Any = None  # training phases: the stage object (``restore_modules(ctx)`` in ``after``)


# ------------------------------------------------------------------------------------------------ keys
def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists stay leaves)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _relative(value: Any, workdir: str) -> Any:
    if isinstance(value, str) and (value == workdir or value.startswith(workdir + os.sep)):
        return "<workdir>" + value[len(workdir):]
    if isinstance(value, list):
        return [_relative(v, workdir) for v in value]
    return value


def config_key(cfg: Config, uses: Sequence[str] | None, workdir: Path) -> dict[str, Any]:
    """The part of ``cfg`` a phase's key holds: ``uses`` prefixes (None: all but :data:`VOLATILE`)."""
    flat = flatten(to_dict(cfg))

    def under(key: str, prefixes) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    keep = {k: v for k, v in flat.items() if (under(k, uses) if uses is not None else not under(k, VOLATILE))}
    w = str(workdir.absolute())
    return {k: _relative(v, w) for k, v in sorted(keep.items())}


def digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["config.optim.lr: 0.002 -> 0.001", "input vae changed", ...]`` between two key trees."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        if k.startswith("inputs."):
            out.append(f"input {k[len('inputs.'):]} changed")
        else:
            out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, obj: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- running
def _latest_step(cfg: Config) -> int | None:
    import logging

    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir

    d = checkpoint_dir(cfg)
    if not d.is_dir():
        return None
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that a read-only manager does not save
    try:
        ck = Checkpointer(d, cfg.checkpoint, read_only=True)
        try:
            return ck.latest_step()
        finally:
            ck.close()
    finally:
        absl.setLevel(level)


class RecipeStopped(Exception):
    """A signal (SIGTERM / SIGINT) stopped a training phase after a checkpoint: the phase is not finished, and
    running the recipe again resumes it."""

    def __init__(self, phase: str, signal_name: str, step: int):
        super().__init__(f"[{phase}] stopped by {signal_name} with a checkpoint at step {step}; run the same "
                         f"command again to resume")
        self.phase, self.signal_name, self.step = phase, signal_name, step

    @property
    def exit_status(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def _train_config(phase: Phase, cfg: Config, folder: Path) -> Config:
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, stage=phase.run, output_dir=str(folder.absolute())),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=True, directory=""),
    )


def _run_train(phase: Phase, ctx: PhaseContext, stage, mesh, run_kwargs, around_train) -> dict:
    from contextlib import nullcontext

    from train.loop import run

    cfg = ctx.cfg
    latest = _latest_step(cfg)
    result = None
    if latest is not None and latest >= cfg.train.steps:
        ctx.say(f"[{phase.name}] checkpoint at step {latest} already complete")
        results = {"end_step": latest, "metrics": {}, "time_limited": False}
    else:
        if latest is not None:
            ctx.say(f"[{phase.name}] resuming from the checkpoint at step {latest} of {cfg.train.steps}")
        with around_train(ctx) if around_train is not None else nullcontext():
            result = run(cfg, stage=stage, mesh=mesh, **run_kwargs)
        if result.stopped_by:
            raise RecipeStopped(phase.name, result.stopped_by, result.end_step)
        results = {"end_step": result.end_step, "metrics": {k: float(v) for k, v in result.last_metrics.items()},
                   "time_limited": bool(result.time_limited)}
    if phase.after is not None:
        results.update(phase.after(ctx, result) or {})
    return results


def run_recipe(phases: Sequence[Phase], base: Config, workdir: str | Path, *, mesh=None, on_change: str = "rebuild",
               say: Callable[[str], None] = print, run_kwargs: Mapping[str, Any] | None = None,
               only: Sequence[str] | None = None, around_train: Callable[[PhaseContext], Any] | None = None,
               on_done: Callable[[PhaseRecord], None] | None = None) -> dict[str, PhaseRecord]:
    """Run (or reuse, resume, rebuild) ``phases`` in order under ``workdir``; returns their records by name.

    ``on_change``: ``"rebuild"`` (default) or ``"refuse"`` (raise :class:`RecipeError` naming the differing
    keys instead). ``run_kwargs`` go to ``train.loop.run`` (e.g. ``console=False``). ``only``: stop after
    these phases and their inputs. Hooks: ``around_train(ctx)`` returns a context manager entered around each
    training run (progress lines; not entered when the checkpoint is already complete); ``on_done(record)``
    is called after each phase, reused or not.
    """
    if on_change not in ("rebuild", "refuse"):
        raise RecipeError(f"on_change must be 'rebuild' or 'refuse', got {on_change!r}")
    workdir = Path(workdir).absolute()
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise RecipeError(f"phase names repeat: {names}")
    for i, p in enumerate(phases):
        unknown = [n for n in p.inputs if n not in names[:i]]
        if unknown:
            raise RecipeError(f"phase {p.name!r} takes inputs {unknown} that are not earlier phases; earlier phases: "
                              f"{', '.join(names[:i]) or '(none)'}")
    wanted = set(names)
    if only is not None:
        bad = [n for n in only if n not in names]
        if bad:
            raise RecipeError(f"unknown phases {bad}; phases: {', '.join(names)}")
        wanted = set()
        stack = list(only)
        while stack:
            n = stack.pop()
            if n not in wanted:
                wanted.add(n)
                stack.extend(phases[names.index(n)].inputs)

    records: dict[str, PhaseRecord] = {}
    for phase in phases:
        if phase.name not in wanted:
            continue
        records[phase.name] = _run_phase(phase, base, workdir, records, mesh, on_change, say, dict(run_kwargs or {}),
                                         around_train)
        if on_done is not None:
            on_done(records[phase.name])
    return records


def _run_phase(phase: Phase, base: Config, workdir: Path, records, mesh, on_change, say, run_kwargs,
               around_train=None) -> PhaseRecord:
    folder = workdir / phase.name
    inputs = {n: records[n] for n in phase.inputs}
    cfg = phase.configure(base, inputs, phase.settings) if phase.configure is not None else base
    stage = None
    if phase.is_train:
        from train.loop import with_stage_settings
        from train.stages import get_stage

        cfg = _train_config(phase, cfg, folder)
        ctx0 = PhaseContext(phase.name, folder, workdir, cfg, phase.settings, inputs, False, say)
        stage = phase.make_stage(cfg, ctx0) if phase.make_stage is not None else get_stage(phase.run, cfg)
        cfg = with_stage_settings(cfg, stage)  # the key holds the settings in force
        kind = f"train:{phase.run}"
        uses = phase.uses
    else:
        kind = f"job:{getattr(phase.run, '__module__', '?')}.{getattr(phase.run, '__qualname__', phase.run)}"
        uses = phase.uses if phase.uses is not None else ()
    tree = {"kind": kind, "config": config_key(cfg, uses, workdir), "settings": _plain(phase.settings),
            "inputs": {n: r.key for n, r in inputs.items()}}
    # Through JSON once, so it compares equal to its saved copy (tuples come back as lists).
    tree = json.loads(json.dumps(tree, sort_keys=True, default=str))
    key = digest(tree)

    done, started = _read(folder / DONE), _read(folder / STARTED)
    status = "ran"
    if done is not None and done.get("key") == key:
        say(f"[{phase.name}] reused ({folder})")
        return PhaseRecord(phase.name, folder, key, done.get("results", {}), "reused", float(done.get("seconds", 0.0)),
                           cfg, stage)
    old = done if done is not None else started
    if old is not None and old.get("key") != key:
        changes = ((describe_changes(old["tree"], tree) if isinstance(old.get("tree"), dict) else
                    ["(a record without its key tree: written by an older version)"]) or ["(the record's format)"])
        if on_change == "refuse":
            raise RecipeError(f"{folder} was built with other settings (differs in: {'; '.join(changes)}). Use "
                              f"another workdir, or delete {folder} and the phases after it to rebuild them")
        say(f"[{phase.name}] rebuilding: {'; '.join(changes)}")
        shutil.rmtree(folder)
        status = "rebuilt"
    elif old is not None:
        status = "resumed"
        say(f"[{phase.name}] resuming an interrupted run")
    _write(folder / STARTED, {"key": key, "tree": tree})
    ctx = PhaseContext(phase.name, folder, workdir, cfg, phase.settings, inputs, status == "resumed", say, stage)
    t0 = time.perf_counter()
    if phase.is_train:
        results = _run_train(phase, ctx, stage, mesh, run_kwargs, around_train)
    else:
        results = dict(phase.run(ctx) or {})
    seconds = time.perf_counter() - t0
    _write(folder / DONE, {"key": key, "tree": tree, "results": results, "seconds": seconds})
    return PhaseRecord(phase.name, folder, key, results, status, seconds, cfg, stage)


def restore_modules(record: PhaseRecord | PhaseContext, mesh=None, *, use_ema: bool = True) -> dict:
    """The trained modules of a finished training phase (its EMA weights when it kept one and ``use_ema``);
    ``record`` may be the phase's context (in its ``after``, once training is complete)."""
    import logging

    from neodragon_jax.sharding import make_mesh
    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir
    from train.state import build_setup

    if record.stage is None:
        raise RecipeError(f"phase {record.name!r} is not a training phase")
    mesh = mesh or make_mesh(record.cfg.mesh)
    setup = build_setup(record.stage, record.cfg, mesh)
    logging.getLogger("absl").setLevel(logging.ERROR)
    ck = Checkpointer(checkpoint_dir(record.cfg), record.cfg.checkpoint, read_only=True)
    try:
        step = ck.latest_step()
        if step is None:
            raise RecipeError(f"no checkpoint under {checkpoint_dir(record.cfg)}")
        state, _, _ = ck.restore(step, setup.abstract_state)
    finally:
        ck.close()
    params = dict(state["params"])
    if use_ema:
        params.update(state.get("ema") or {})  # the roles that kept an EMA
    return setup.modules(params, state["model_state"])
