"""The release's sampler with its exported LiteRT graphs in place of the JAX models they replace, scored end to
end on held-out prompts: what the phone's text encoders and decoder do to the strict scorer's accuracy.

``LiteRTPipeline`` is a ``TextToVideoPipeline`` whose ``encode_text`` runs the ``.tflite`` text graphs
(``clip_l``, ``clip_g`` and ``distil_t5`` + ``context_adapter``, or the teacher's ``t5``) and whose ``decode``
runs the ``light_decoder`` graph, each at one precision; the MMDiT is still sampled in JAX (its static graphs
need ``pyramid.frames_per_unit = 1``, see ``export.components.stage_grids``), so every row says which
components ran on LiteRT. :func:`score_exported` scores each precision on the same prompts and seeds as the
JAX pipeline and reports the change in points.
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


@dataclasses.dataclass
class LiteRTPipeline(TextToVideoPipeline):
    """``TextToVideoPipeline`` with LiteRT text encoders and decoder (see the module docstring)."""

    graphs: dict = dataclasses.field(default_factory=dict, repr=False)
    precision: str = ""

    @classmethod
    def wrap(cls, pipe: TextToVideoPipeline, tflite_dir: str | Path, precision: str,
             threads: int | None = 1) -> "LiteRTPipeline":
        tflite_dir = Path(tflite_dir)
        kind = pipe.cfg.model.text.kind
        text_names = ("clip_l", "clip_g") + (("distil_t5", "context_adapter") if kind == "neodragon" else ("t5",))
        graphs = {n: g for n in text_names + ("light_decoder",)
                  if (g := _graph(tflite_dir, n, precision, threads)) is not None}
        missing = [n for n in text_names if n not in graphs]
        if missing:
            raise LiteRTScoreError(f"{tflite_dir} has no {precision} graphs of {', '.join(missing)}: run `neodragon "
                                   f"export tflite` for this model first")
        fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(TextToVideoPipeline) if f.init}
        fields.update(_sampler=None, _jitted={}, source=f"{pipe.source} with LiteRT {precision} graphs")
        return cls(**fields, graphs=graphs, precision=precision)

    @property
    def on_litert(self) -> list[str]:
        return sorted(self.graphs)

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
        say(f"[litert] {precision}: {', '.join(lp.on_litert)} on LiteRT, the MMDiT in JAX; {len(prompts)} prompts")
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
        "The sampler with the LiteRT graphs in place of the JAX text encoders and decoder (the MMDiT stays in "
        "JAX), scored by the strict scorer beside chance; change = LiteRT - JAX in accuracy points "
        f"({' / '.join(JUDGED)}); PSNR of the uint8 videos against the JAX pipeline's (same prompts and seeds; "
        "99 = identical).", "", markdown_table(header, body), ""])
