"""Teacher-generated training data for step distillation (spec §7.2: DMD trains on videos the teacher made).

:func:`synthesize_records` runs a text-to-video pipeline's sampler (the teacher's schedule and CFG) over a prompt
list in batches and writes one record per video in the flow stage's format (``latents`` as the sampler returns
them, normalised; the prompt's text features; the empty prompt's ``null_*`` features; the caption). Resumable:
a batch whose records all exist is skipped, records are written atomically, and the folder's ``synthesize.json``
key (teacher, schedule, prompts, seed, batch) must match to resume. Several processes (hosts) split the batches
(``process_index`` / ``process_count``); within a process each batch is split over the local devices (data
parallel: the weights replicated, the batch sharded), so a host with 8 chips makes 8 videos at once. A batch
is always sampled at its full size (the last one padded with its final prompt, the padding discarded; fewer
prompts than a batch make one batch of their number), so the records are the same function of (seed, batch)
on any number of devices.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

RECORDS = "records"
KEY_FILE = "synthesize.json"


class SynthesizeError(ValueError):
    """The output folder holds records made with other settings, or the request cannot be run."""


def synthesis_key(pipe, prompts: Sequence[str], *, first, later, scales, seed: int, batch: int, num_frames: int) -> dict:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return {"teacher": pipe.source, "first_unit_steps": list(first), "later_unit_steps": list(later),
            "cfg": [float(x) for x in scales], "seed": int(seed), "batch": int(batch), "num_frames": int(num_frames),
            "prompts": len(prompts), "prompts_sha256": digest,
            "negative_prompt": pipe.cfg.sampling.negative_prompt}


def _atomic_save(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **record)
    tmp.replace(path)


def synthesize_records(pipe, prompts: Sequence[str], out_dir: str | Path, *, batch: int = 16, first_unit_steps=None,
                       later_unit_steps=None, cfg_scales=None, seed: int = 0, num_frames: int | None = None,
                       process_index: int = 0, process_count: int = 1, devices: int | None = None,
                       progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Write ``out_dir/records/NNNNNN.npz`` for every prompt (video ``i`` = prompt ``i``; the noise of batch ``j``
    comes from ``fold_in(key(seed), j)``). ``devices``: local devices each batch is split over (default: the
    most of them that divide ``batch``). Returns the key plus counts (written, skipped) and the devices used."""
    from neodragon_jax.pipelines.text_to_video import latent_shape

    if batch < 1 or not prompts:
        raise SynthesizeError("need at least one prompt and a batch of at least 1")
    if not 0 <= process_index < process_count:
        raise SynthesizeError(f"process_index {process_index} out of range for {process_count} processes")
    s = pipe.cfg.sampling
    first = tuple(first_unit_steps or s.first_unit_steps)
    later = tuple(later_unit_steps or s.later_unit_steps)
    scales = tuple(cfg_scales) if cfg_scales is not None else (s.first_unit_cfg, s.later_unit_cfg)
    frames = pipe.cfg.video.num_frames if num_frames is None else int(num_frames)
    key = synthesis_key(pipe, prompts, first=first, later=later, scales=scales, seed=seed, batch=batch,
                        num_frames=frames)
    out = Path(out_dir)
    rec_dir = out / RECORDS
    key_path = out / KEY_FILE
    if key_path.is_file():
        old = json.loads(key_path.read_text())
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise SynthesizeError(f"{out} holds records synthesized with other settings ({', '.join(diff)} differ); "
                                  f"use another --out or the same settings to resume")
    # Fewer prompts than a batch: one batch of them (no padding up to an unused size).
    full = min(batch, len(prompts))
    mesh = _batch_mesh(full, devices)
    rec_dir.mkdir(parents=True, exist_ok=True)
    if process_index == 0:
        key_path.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    if mesh is not None:
        _replicate(pipe, mesh)

    t_lat, h_lat, w_lat = latent_shape(pipe.cfg, frames)
    null = pipe.encode_text([s.negative_prompt])
    null_np = {"null_text_tokens": np.asarray(null.tokens[0], np.float32),
               "null_text_mask": np.asarray(null.mask[0]).astype(np.int32),
               "null_pooled": np.asarray(null.pooled[0], np.float32)}
    uses_cfg = any(w > 0 for w in scales)
    batches = [j for j in range(-(-len(prompts) // batch)) if j % process_count == process_index]
    written = skipped = 0
    t0 = time.perf_counter()
    for n, j in enumerate(batches):
        rows = list(range(j * batch, min((j + 1) * batch, len(prompts))))
        paths = [rec_dir / f"{i:06d}.npz" for i in rows]
        if all(p.is_file() for p in paths):
            skipped += len(rows)
            continue
        texts = [pipe.full_prompt(prompts[i]) for i in rows]
        texts += texts[-1:] * (full - len(texts))  # a full batch: the same noise shapes on any device count
        cond = pipe.encode_text(texts)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            cond = type(cond)(*(jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch"))) for x in cond))
        res = pipe.sampler.sample(
            cond, num_frames=t_lat, height=h_lat, width=w_lat, key=jax.random.fold_in(jax.random.key(seed), j),
            first_unit_steps=first, later_unit_steps=later, first_unit_cfg=scales[0], later_unit_cfg=scales[1],
            uncond=null if uses_cfg else None, channels=pipe.cfg.model.mmdit.in_channels)
        latents = np.asarray(jax.device_get(res.latents), np.float32)
        tokens, mask, pooled = (np.asarray(x) for x in cond)
        for r, (i, path) in enumerate(zip(rows, paths)):
            _atomic_save(path, {"latents": latents[r], "text_tokens": tokens[r].astype(np.float32),
                                "text_mask": mask[r].astype(np.int32), "pooled": pooled[r].astype(np.float32),
                                "caption": np.asarray(prompts[i]), **null_np})
            written += 1
        if progress is not None:
            progress(n + 1, len(batches), time.perf_counter() - t0)
    return {**key, "written": written, "skipped": skipped, "nfe_per_video": res.nfe if written else None,
            "devices": 1 if mesh is None else int(mesh.devices.size)}


def _batch_mesh(batch: int, devices: int | None):
    """A 1-D mesh over the local devices a batch is split over, or None for one device."""
    local = jax.local_devices()
    if devices is None:
        devices = max(d for d in range(1, len(local) + 1) if batch % d == 0)
    if not 1 <= devices <= len(local):
        raise SynthesizeError(f"devices={devices}: this process has {len(local)} local device(s)")
    if batch % devices:
        raise SynthesizeError(f"a batch of {batch} does not split over {devices} devices; use a batch that is a "
                              f"multiple of {devices}")
    if devices == 1:
        return None
    from jax.sharding import Mesh

    return Mesh(np.asarray(local[:devices]), ("batch",))


def _replicate(pipe, mesh) -> None:
    """Every weight the sampler and the text encoders read, on every device of ``mesh``."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    for module in (pipe.text, pipe.mmdit):
        nnx.update(module, jax.device_put(nnx.state(module), replicated))


def records_folder(out_dir: str | Path) -> Path:
    return Path(out_dir) / RECORDS


__all__ = ["KEY_FILE", "RECORDS", "SynthesizeError", "records_folder", "synthesis_key", "synthesize_records"]
