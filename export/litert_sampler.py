"""The release's sampler with its exported LiteRT graphs in place of the JAX models they replace, scored end to
end on held-out prompts: what the phone's graphs do to the strict scorer's accuracy.

``LiteRTPipeline`` is a ``TextToVideoPipeline`` whose ``encode_text`` runs the ``.tflite`` text graphs
(``clip_l``, ``clip_g`` and ``distil_t5`` + ``context_adapter``, or the teacher's ``t5``), whose sampler calls
the static MMDiT stage graphs (:class:`LiteRTMMDiT`) and whose ``decode`` runs the ``light_decoder`` graph,
each at one precision. A graph that was not exported (or MMDiT graphs split with ``--mmdit-split``) stays in
JAX, and every row says which ran on LiteRT. :func:`score_exported` scores each precision on the same prompts
and seeds as the JAX pipeline and reports the change in points.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

#: Points (accuracy x 100) an exported precision may lose on a judged attribute (issue 21's acceptance).
TOLERANCE_POINTS = 2.0
JUDGED = ("colour", "motion")


class LiteRTScoreError(RuntimeError):
    """The exported graphs cannot stand in for the pipeline's models (missing files, shapes that differ)."""


def _graph(tflite_dir: Path, name: str, precision: str, threads: int | None):
    from export.tflite import LiteRTRunner

    path, io = tflite_dir / f"{name}.{precision}.tflite", tflite_dir / f"{name}.io.json"
    if not path.is_file() or not io.is_file():
        return None
    return LiteRTRunner(path, num_threads=threads), json.loads(io.read_text())


def _check_shape(name: str, io: dict, which: str, index: int, shape: tuple[int, ...]) -> None:
    want = tuple(io[which][index]["shape"])
    if tuple(shape) != want:
        raise LiteRTScoreError(f"{name}: the graph's {io[which][index]['name']} is {want}, the pipeline gives "
                               f"{tuple(shape)}; export the graphs from this model (same config and frames)")


class LiteRTMMDiT:
    """The sampler's model callable (``model(clips, tokens, mask, pooled, timestep) -> velocity``) backed by the
    exported static stage graphs, called from the jitted Euler step through ``jax.pure_callback``.

    A stage graph holds the last unit's layout: one slot per history frame, oldest first, then the current
    clip. An earlier unit's history, split into frames, fills the newest slots (the resolutions line up:
    ``export.components.stage_grids``) and the rest are marked unused in ``history_valid``. Unit 0 runs the
    ``_first`` graph of the stage when the model has several frames per unit."""

    def __init__(self, graphs: dict):
        self.graphs = graphs  # name -> (LiteRTRunner, io.json)
        self.current_shape = {}  # graph name -> (frames, H, W) of its current clip
        for name, (_, io) in graphs.items():
            shapes = {i["name"]: tuple(i["shape"]) for i in io["inputs"]}
            self.current_shape[name] = shapes["current"][2:]

    def _pick(self, frames: int, hw: tuple[int, int], has_history: bool) -> str:
        fits = [n for n, shape in self.current_shape.items() if shape == (frames, *hw)]
        first = [n for n in fits if n.endswith("_first")]
        later = [n for n in fits if not n.endswith("_first")]
        # unit 0 takes its own graph where there is one; else the stage graph with every slot unused
        chosen = later if has_history else first or later
        if not chosen:
            raise LiteRTScoreError(f"no exported MMDiT graph takes a current clip of {frames} frame(s) at {hw}"
                                   + (" with history" if has_history else "") + f"; graphs: {self.current_shape}")
        return chosen[0]

    def _host(self, history, current, tokens, mask, pooled, timestep):
        b, _, frames, h, w = current.shape
        name = self._pick(frames, (h, w), bool(history))
        runner, io = self.graphs[name]
        slots = [tuple(i["shape"]) for i in io["inputs"] if i["name"].startswith("clip_")]
        per_frame = [c[:, :, k : k + 1] for c in history for k in range(c.shape[2])]  # oldest first
        if len(per_frame) > len(slots):
            raise LiteRTScoreError(f"{name}: {len(per_frame)} history frames for {len(slots)} slots")
        filled = len(slots) - len(per_frame)
        out = []
        for i in range(b):
            clips = [np.zeros(sh, np.float32) for sh in slots]
            for k, frame in enumerate(per_frame):
                if tuple(frame[i : i + 1].shape) != slots[filled + k]:
                    raise LiteRTScoreError(f"{name}: history frame {k} is {frame.shape[2:]}, its slot "
                                           f"{slots[filled + k][2:]}")
                clips[filled + k] = frame[i : i + 1]
            inputs = clips + [current[i : i + 1]]
            if slots:
                inputs.append((np.arange(len(slots)) >= filled).astype(np.float32)[None])
            inputs += [tokens[i : i + 1], mask[i : i + 1], pooled[i : i + 1], timestep[i : i + 1]]
            out.append(runner([np.ascontiguousarray(a, dtype=spec["dtype"])
                               for a, spec in zip(inputs, io["inputs"])])[0])
        return np.concatenate(out).astype(np.float32)

    def __call__(self, clips, tokens, mask, pooled, timestep):
        import jax

        history, current = list(clips[:-1]), clips[-1]
        result = jax.ShapeDtypeStruct(current.shape, np.float32)
        return jax.pure_callback(self._host, result, history, current, tokens, mask.astype(np.float32), pooled,
                                 timestep)


@dataclasses.dataclass
class LiteRTPipeline(TextToVideoPipeline):
    """``TextToVideoPipeline`` with its exported LiteRT graphs in place of the JAX models (module docstring)."""

    graphs: dict = dataclasses.field(default_factory=dict, repr=False)
    precision: str = ""

    @classmethod
    def wrap(cls, pipe: TextToVideoPipeline, tflite_dir: str | Path, precision: str,
             threads: int | None = 1) -> "LiteRTPipeline":
        tflite_dir = Path(tflite_dir)
        kind = pipe.cfg.model.text.kind
        text_names = ("clip_l", "clip_g") + (("distil_t5", "context_adapter") if kind == "neodragon" else ("t5",))
        from export.components import component_names

        mmdit_names = tuple(n for n in component_names(pipe.cfg) if n.startswith("mmdit"))
        graphs = {n: g for n in text_names + ("light_decoder",) + mmdit_names
                  if (g := _graph(tflite_dir, n, precision, threads)) is not None}
        partial = [n for n in mmdit_names if n not in graphs]
        if len(partial) not in (0, len(mmdit_names)):
            raise LiteRTScoreError(f"{tflite_dir} has {precision} graphs of some MMDiT stages but not of "
                                   f"{', '.join(partial)}: export all of them, or none (the MMDiT then runs in JAX)")
        missing = [n for n in text_names if n not in graphs]
        if missing:
            raise LiteRTScoreError(f"{tflite_dir} has no {precision} graphs of {', '.join(missing)}: run `neodragon "
                                   f"export tflite` for this model first")
        fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(TextToVideoPipeline) if f.init}
        fields.update(_sampler=None, _jitted={}, source=f"{pipe.source} with LiteRT {precision} graphs")
        return cls(**fields, graphs=graphs, precision=precision)

    @property
    def on_litert(self) -> list[str]:
        names = sorted(n for n in self.graphs if not n.startswith("mmdit"))
        return names + (["mmdit"] if self.mmdit_graphs else [])

    @property
    def mmdit_graphs(self) -> dict:
        return {n: g for n, g in self.graphs.items() if n.startswith("mmdit")}

    @property
    def sampler(self):
        if self._sampler is None and self.mmdit_graphs:
            from neodragon_jax.pyramid.sampler import PyramidSampler
            from neodragon_jax.pyramid.scheduler import make_schedule

            self._sampler = PyramidSampler(LiteRTMMDiT(self.mmdit_graphs), make_schedule(self.cfg.pyramid))
        return super().sampler

    def _run(self, name: str, *inputs: np.ndarray) -> list[np.ndarray]:
        runner, io = self.graphs[name]
        for i, a in enumerate(inputs):
            _check_shape(name, io, "inputs", i, a.shape)
        return runner([np.ascontiguousarray(a, dtype=io["inputs"][i]["dtype"]) for i, a in enumerate(inputs)])

    def encode_text(self, prompts: Sequence[str]):
        from neodragon_jax.pyramid.loss import TextCondition

        tok = self.tokenizers(list(prompts))
        tokens, pooled = [], []
        for i in range(len(prompts)):  # the graphs are exported at batch 1
            ids, mask = np.asarray(tok.t5_ids[i : i + 1]), np.asarray(tok.t5_mask[i : i + 1])
            if "t5" in self.graphs:
                (t,) = self._run("t5", ids, mask)
            else:
                (feats,) = self._run("distil_t5", ids, mask)
                (t,) = self._run("context_adapter", feats)
            (pl,) = self._run("clip_l", np.asarray(tok.clip_l_ids[i : i + 1]))
            (pg,) = self._run("clip_g", np.asarray(tok.clip_g_ids[i : i + 1]))
            tokens.append(t)
            pooled.append(np.concatenate([pl, pg], -1))
        return TextCondition(jnp.asarray(np.concatenate(tokens)), jnp.asarray(tok.t5_mask),
                             jnp.asarray(np.concatenate(pooled)))

    def decode(self, latents):
        if "light_decoder" not in self.graphs:
            return super().decode(latents)
        from neodragon_jax.models.vae.normalize import denormalize_latents

        z = np.asarray(denormalize_latents(latents, self.cfg.model.vae), np.float32)
        videos = [self._run("light_decoder", z[i : i + 1])[0] for i in range(z.shape[0])]
        return jnp.asarray(np.concatenate(videos))


def _row(label: str, res, **extra) -> dict:
    return {"label": label, "schedule": res.schedule, "videos": len(res.prompts), "nfe": res.nfe,
            "accuracy": dict(res.report.accuracy), "chance": dict(res.chance),
            "seconds_per_video": res.seconds_per_video, **extra}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def score_exported(pipe: TextToVideoPipeline, tflite_dir: str | Path, precisions: Sequence[str],
                   prompts: Sequence[str], *, reference: dict | None = None, threads: int | None = 1,
                   say: Callable[[str], None] = print) -> dict:
    """The JAX pipeline (``reference``: its recorded row on the same prompts and seeds, else measured now) and
    the pipeline with each precision's LiteRT graphs, on ``prompts`` (seed = prompt index), at the config's
    schedule. Each LiteRT row has ``change_points`` per judged attribute and ``within_tolerance``."""
    from neodragon_jax.eval.heldout import evaluate_heldout

    ref_videos = None
    if reference is None or reference.get("videos") != len(prompts):
        say(f"[litert] scoring the JAX pipeline on {len(prompts)} held-out prompts (the reference)")
        ref = evaluate_heldout(pipe, prompts)
        reference, ref_videos = _row("JAX", ref), ref.videos
    else:
        reference = {**reference, "label": "JAX (recorded)"}
    rows = [reference]
    for precision in precisions:
        lp = LiteRTPipeline.wrap(pipe, tflite_dir, precision, threads)
        rest = "" if lp.mmdit_graphs else ", the MMDiT in JAX"
        say(f"[litert] {precision}: {', '.join(lp.on_litert)} on LiteRT{rest}; {len(prompts)} prompts")
        res = evaluate_heldout(lp, prompts)
        change = {a: 100.0 * (res.report.accuracy[a] - reference["accuracy"][a]) for a in JUDGED}
        # how far the videos themselves moved (same prompts and seeds): uint8 frames, peak 255
        psnr = None if ref_videos is None else float(np.mean([_psnr(a, b) for a, b in zip(res.videos, ref_videos)]))
        rows.append(_row(f"LiteRT {precision}", res, precision=precision, on_litert=lp.on_litert,
                         change_points=change, psnr_vs_jax_db=psnr,
                         within_tolerance=all(c >= -TOLERANCE_POINTS for c in change.values())))
        say(f"[litert] {precision}: " + ", ".join(
            f"{a} {res.report.accuracy[a]:.3f} ({change[a]:+.1f} points)" for a in JUDGED))
    return {"prompts": len(prompts), "tolerance_points": TOLERANCE_POINTS, "judged": list(JUDGED), "rows": rows}


def markdown(result: dict) -> str:
    from neodragon_jax.eval.report import markdown_table

    header = ["graphs", "on LiteRT", "colour (chance)", "motion (chance)", "change (points)", "within 2 points",
              "video PSNR vs JAX", "s per video"]
    body = []
    for r in result["rows"]:
        change = r.get("change_points")
        body.append([r["label"], ", ".join(r.get("on_litert", [])) or "-",
                     *(f"{r['accuracy'][a]:.3f} ({r['chance'][a]:.3f})" for a in JUDGED),
                     " / ".join(f"{change[a]:+.1f}" for a in JUDGED) if change else "-",
                     ("yes" if r["within_tolerance"] else "NO") if change else "-",
                     "-" if r.get("psnr_vs_jax_db") is None else f"{r['psnr_vs_jax_db']:.1f} dB",
                     f"{r['seconds_per_video']:.3f}"])
    return "\n".join([
        f"## End to end through the exported graphs ({result['prompts']} held-out prompts, seeds 0..)", "",
        "The sampler with the exported LiteRT graphs in place of the JAX models ('on LiteRT'; the rest stays "
        "in JAX), scored by the strict scorer beside chance; change = LiteRT - JAX in accuracy points "
        f"({' / '.join(JUDGED)}); PSNR of the uint8 videos against the JAX pipeline's (same prompts and seeds; "
        "99 = identical).", "", markdown_table(header, body), ""])
