"""The recipe runner: a two-phase recipe (a data job, then a training stage on its records) is reused when
nothing it depends on changed, rebuilt (naming the differing keys) when something did, and resumed when it
was interrupted."""

import contextlib
import dataclasses
import json

import jax
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.sharding import make_mesh
from train.data import write_npz_records
from train.recipe import JobPhase, RecipeError, TrainPhase, restore_modules, run_recipe


@dataclasses.dataclass(frozen=True)
class DataSettings:
    n: int = 24
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FitSettings:
    steps: int = 4
    lr: float = 1e-2


CALLS: list[str] = []


def make_records(ctx):
    CALLS.append(ctx.name)
    s = ctx.settings
    rng = np.random.default_rng(s.seed)
    x = rng.standard_normal((s.n, 8, 16), dtype=np.float32)
    write_npz_records(ctx.dir / "records", [{"x": a, "y": np.sin(a)} for a in x])
    return {"records": s.n}


def fit_config(base, inputs, s):
    """The phase's own settings overwrite the base config's optimiser: a --set optim.lr is not in force."""
    return dataclasses.replace(
        base, train=dataclasses.replace(base.train, steps=s.steps),
        optim=dataclasses.replace(base.optim, lr=s.lr),
        data=dataclasses.replace(base.data, source="records", path=str(inputs["data"].dir / "records")))


def recipe(data=DataSettings(), fit=FitSettings()):
    return [JobPhase("data", make_records, settings=data),
            TrainPhase("fit", "toy", inputs=("data",), settings=fit, configure=fit_config)]


def _base(*extra):
    return load_config("tiny", ["train.global_batch=4", "checkpoint.every_steps=2", "checkpoint.keep_latest=4",
                                "train.tensorboard=false", "train.peak_flops=1e9", "mesh.data=1", "mesh.fsdp=1",
                                *extra])


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _run(work, mesh, base=None, lines=None, **kw):
    lines = [] if lines is None else lines
    recs = run_recipe(kw.pop("phases", recipe()), base or _base(), work, mesh=mesh, say=lines.append,
                      run_kwargs={"console": False}, **kw)
    return {n: r.status for n, r in recs.items()}, recs, lines


def test_reuse_rebuild_and_resume(tmp_path, mesh):
    work = tmp_path / "work"
    CALLS.clear()
    # Hooks: around_train is entered around each training run, on_done sees every phase; after gets the
    # phase's context, from which restore_modules reads the trained modules.
    events = []

    @contextlib.contextmanager
    def around(ctx):
        events.append(("enter", ctx.name, (ctx.dir / "checkpoints").is_dir()))
        yield
        events.append(("exit", ctx.name, sorted(p.name for p in (ctx.dir / "checkpoints").iterdir())))

    def after(ctx, result):
        modules = restore_modules(ctx, mesh)
        return {"after": [result.end_step, sorted(modules)]}

    phases = recipe()
    phases[1] = dataclasses.replace(phases[1], after=after)
    status, recs, _ = _run(work, mesh, phases=phases, around_train=around,
                           on_done=lambda r: events.append(("done", r.name, r.status)))
    assert status == {"data": "ran", "fit": "ran"} and recs["fit"].results["end_step"] == 4
    assert events == [("done", "data", "ran"), ("enter", "fit", False), ("exit", "fit", ["2", "4"]),
                      ("done", "fit", "ran")]
    assert recs["fit"].results["after"] == [4, sorted(restore_modules(recs["fit"], mesh))]
    assert json.loads((work / "fit" / "config.json").read_text())["optim"]["lr"] == 1e-2
    events.clear()
    status, _, _ = _run(work, mesh, phases=phases, around_train=around,
                        on_done=lambda r: events.append(("done", r.name, r.status)))
    assert events == [("done", "data", "reused"), ("done", "fit", "reused")]  # nothing trained: no enter

    # Nothing it depends on changed: a --set the phase overwrites (optim.lr) or that only lays the run out.
    status, again, lines = _run(work, mesh, _base("optim.lr=0.5", "train.log_every=3", "checkpoint.every_steps=3"))
    assert status == {"data": "reused", "fit": "reused"} and CALLS == ["data"], lines
    assert again["fit"].key == recs["fit"].key and again["data"].results == {"records": 24}

    # A setting the training phase reads (train.seed, not keyed by the old demo) rebuilds it, not the data.
    status, seeded, lines = _run(work, mesh, _base("train.seed=3"))
    assert status == {"data": "reused", "fit": "rebuilt"}
    assert "[fit] rebuilding: config.train.seed: 0 -> 3" in lines
    # A changed data setting rebuilds the data and, through its key, the phase that reads it.
    status, _, lines = _run(work, mesh, _base("train.seed=3"), phases=recipe(DataSettings(n=32)))
    assert status == {"data": "rebuilt", "fit": "rebuilt"} and CALLS == ["data", "data"]
    assert "[data] rebuilding: settings.n: 24 -> 32" in lines and "[fit] rebuilding: input data changed" in lines

    # Interrupted after its checkpoint at step 2: the training phase resumes from it.
    (work / "fit" / "DONE.json").unlink()
    import shutil

    shutil.rmtree(work / "fit" / "checkpoints" / "4")
    status, resumed, lines = _run(work, mesh, _base("train.seed=3"), phases=recipe(DataSettings(n=32)))
    assert status == {"data": "reused", "fit": "resumed"}
    assert "[fit] resuming from the checkpoint at step 2 of 4" in lines and resumed["fit"].results["end_step"] == 4
    steps = [json.loads(line)["step"] for line in (work / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]

    with pytest.raises(RecipeError, match=r"built with other settings \(differs in: config.optim.lr: 0.01 -> 0.02; "
                                          r"settings.lr: 0.01 -> 0.02\)"):
        _run(work, mesh, _base("train.seed=3"), phases=recipe(DataSettings(n=32), FitSettings(lr=2e-2)),
             on_change="refuse")


def test_an_interrupted_job_resumes_and_inputs_must_come_first(tmp_path, mesh):
    seen = []

    def flaky(ctx):
        seen.append(ctx.resumed)
        (ctx.dir / "part").mkdir(parents=True, exist_ok=True)
        if len(seen) == 1:
            raise KeyboardInterrupt  # stopped half way: its folder holds partial output
        return {"parts": len(list(ctx.dir.iterdir()))}

    phases = [JobPhase("job", flaky, settings={"k": 1})]
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, mesh, phases=phases)
    status, recs, _ = _run(tmp_path, mesh, phases=phases)
    assert status == {"job": "resumed"} and seen == [False, True]
    with pytest.raises(RecipeError, match=r"phase 'fit' takes inputs \['data'\] that are not earlier phases"):
        _run(tmp_path, mesh, phases=recipe()[::-1])
