"""VAE recipe sweep: train the demo's VAE with one recipe, score its held-out reconstructions.

Each run trains ``train.vae.VAEStage`` (the demo's loss) on random crops of a demo workdir's decoded training
clips, then reconstructs the held-out renders (posterior mean, whole clips) and scores them with the
pixel scorer. One JSON line per run goes to ``--out``: held-out PSNR, per-attribute accuracy, quality figures
and the training-loss curve. Recipes are ``key=value`` words; ``set=`` takes ``;``-separated config overrides
on top of the demo's own (``neodragon_cli.demo.DEMO_OVERRIDES``)::

    python bench/bench_vae_recipes.py --workdir runs/demo A steps=800 chroma=0 \\
        set="model.vae.causal.norm_groups=1;model.vae.causal.temporal_down=[true,true,true,false]"
    python bench/bench_vae_recipes.py --workdir runs/demo B steps=800 frames=9 batch=8

The first run caches the clips and held-out videos in ``<workdir>/bench_vae_recipes.npz`` (about 20 MB; copy
it beside a checkout to run recipes on a machine without the workdir, e.g. several in parallel on one GPU
with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: this is how the recipes in the README's Demo notes were measured).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np

DEFAULTS = dict(steps=800, batch=32, lr=4e-3, init="inflated", zero=1, chroma=1.0, crop=32, frames=1, set="",
                seed=0, evalevery=0)


def load_arrays(workdir: Path, cfg):
    cache = workdir / "bench_vae_recipes.npz"
    if not cache.exists():
        from neodragon_cli.demo import _load_videos

        clips = glob.glob(str(workdir / "vae" / "clip_cache" / "*.npy"))
        if not clips:
            raise SystemExit(f"no decoded clip cache under {workdir / 'vae' / 'clip_cache'}: run `neodragon demo "
                             f"--workdir {workdir}` first (its vae phase writes it)")
        heldout, texts = _load_videos(workdir / "data" / "heldout", cfg, limit=48)
        np.savez_compressed(cache, clips=np.load(clips[0]), heldout=heldout.astype(np.float16), texts=np.array(texts))
    d = np.load(cache)
    return d["clips"], d["heldout"].astype(np.float32), [str(t) for t in d["texts"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--out", default="vae_recipes.jsonl")
    ap.add_argument("name")
    ap.add_argument("recipe", nargs="*",
                    help="key=value: " + ", ".join(f"{k} (default {v!r})" for k, v in DEFAULTS.items()))
    args = ap.parse_args()
    a = dict(DEFAULTS)
    for kv in args.recipe:
        k, _, v = kv.partition("=")
        if k not in a:
            raise SystemExit(f"unknown recipe key {k!r}; valid: {', '.join(a)}")
        a[k] = type(a[k])(v)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from neodragon_cli.demo import DEFAULT_CONFIG, DEMO_OVERRIDES
    from neodragon_jax.config import load_config
    from neodragon_jax.data.video_io import to_uint8_frames
    from neodragon_jax.eval.scorer import score_pairs
    from train.vae import VAEStage, reconstruct, to_model_video

    cfg = load_config(DEFAULT_CONFIG, list(DEMO_OVERRIDES) + [s for s in a["set"].split(";") if s])
    clips, heldout, texts = load_arrays(Path(args.workdir), cfg)
    stage = VAEStage(cfg, clip_frames=a["frames"], crop=a["crop"], progress=False, kernel_init=a["init"],
                     zero_init_residual=bool(a["zero"]))
    vae = stage.build_trainable(cfg, nnx.Rngs(a["seed"]))["vae"]
    graphdef, params = nnx.split(vae)
    sched = optax.warmup_cosine_decay_schedule(0, a["lr"], min(50, a["steps"] // 10), a["steps"], a["lr"] * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.99, weight_decay=0.0))
    opt_state = opt.init(params)

    def loss_fn(p, x, key):
        v = nnx.merge(graphdef, p)
        total, m = stage.loss({"vae": v}, {}, {"video": x}, key)
        if a["chroma"]:  # extra MSE on the colour-difference signal (RGB minus its per-pixel mean)
            rec = v.decode(v.encode(x).mean).astype(jnp.float32)
            chroma = lambda y: y - y.mean(1, keepdims=True)  # noqa: E731
            total = total + a["chroma"] * jnp.mean(jnp.square(chroma(rec) - chroma(x)))
        return total, m["mse"]

    @jax.jit
    def step(p, o, x, key):
        (_, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, mse

    rng = np.random.default_rng(a["seed"])
    F, C = a["frames"], a["crop"]
    n_clips, clip_f, clip_h, clip_w = clips.shape[:4]

    def batch():
        out = []
        for _ in range(a["batch"]):
            c = clips[rng.integers(n_clips)]
            t0, y0, x0 = (rng.integers(0, n - k + 1) for n, k in ((clip_f, F), (clip_h, C), (clip_w, C)))
            out.append(to_model_video(c[t0:t0 + F, y0:y0 + C, x0:x0 + C]))
        return jnp.asarray(np.stack(out))

    def evaluate():
        nnx.update(vae, params)
        rec, psnr, _ = reconstruct(vae, heldout, batch_size=4)
        return float(psnr.mean()), score_pairs((to_uint8_frames(x), t) for x, t in zip(rec, texts))

    key = jax.random.PRNGKey(a["seed"])
    t_start, mses, curve = time.time(), [], []
    for i in range(a["steps"]):
        key, k = jax.random.split(key)
        params, opt_state, mse = step(params, opt_state, batch(), k)
        mses.append(mse)
        if (i + 1) % 250 == 0 or i + 1 == a["steps"]:
            entry = {"step": i + 1, "mse": round(float(np.mean([float(m) for m in mses[-250:]])), 4),
                     "s": round(time.time() - t_start, 1)}
            if a["evalevery"] and (i + 1) % a["evalevery"] == 0 and i + 1 < a["steps"]:
                p, rep = evaluate()
                entry.update(psnr=round(p, 2), colour=rep.accuracy.get("colour"), motion=rep.accuracy.get("motion"))
            curve.append(entry)
            print(args.name, entry, flush=True)
    train_s = time.time() - t_start
    psnr, rep = evaluate()
    res = {"name": args.name, "recipe": a, "device": jax.devices()[0].platform, "train_s": round(train_s, 1),
           "heldout_psnr": round(psnr, 2), "accuracy": rep.accuracy, "quality": rep.quality, "curve": curve}
    print(f"{args.name}: held-out PSNR {psnr:.2f} dB, colour {rep.accuracy['colour']:.3f}, "
          f"motion {rep.accuracy['motion']:.3f}, saturation {rep.quality['saturation']:.3f} ({train_s:.0f} s)")
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
