"""Official-layout folder writer and reader, the text mirrors, and a whole tiny text-to-video run replayed in
PyTorch with the mirrors.

- JAX pipeline -> folder (``diffusion_transformer_320p/``, ``causal_video_vae/``, ``text_encoder*/``,
  ``context_adapter/``, ``tokenizer*/``) -> ``TextToVideoPipeline.from_official`` is bit-identical (float32).
- The same folder loads into the PyTorch mirrors (strict), and ``dtype="official"`` writes the release's
  storage dtypes.
- Text conditioner (transformers CLIP / T5 inside the official wrappers) vs JAX: max abs error <= 1e-5.
- Replay: ``pipeline.generate`` (JAX) vs the same sampling loop written in PyTorch around the mirrors, fed the
  JAX run's initial noise and jump noises. Tolerances: latents <= 1e-4 (magnitude ~10, CFG scale 7 amplifies
  model differences ~13x), decoded video <= 2e-5, uint8 frames differ by at most 1 (truncation at a boundary).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch.nn.functional as F
from flax import nnx

torch = pytest.importorskip("torch")

import export.convert as ec  # noqa: E402
from export.convert import (  # noqa: E402
    config_from_official_folder,
    jax_to_official_folder,
    official_folder_to_jax,
    official_folder_to_mirror,
    random_weights,
    to_mirror,
)
from export.mirror.text import ContextAdapter, DistilT5  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402
from neodragon_jax.config.schema import ContextAdapterConfig, DistilT5Config  # noqa: E402
from neodragon_jax.convert.io import param_arrays, read_safetensors  # noqa: E402
from neodragon_jax.models.mmdit import PyramidMMDiT  # noqa: E402
from neodragon_jax.models.text.conditioner import TextConditioner  # noqa: E402
from neodragon_jax.models.text.tokenizers import TextTokenizers  # noqa: E402
from neodragon_jax.models.vae import CausalVideoVAE  # noqa: E402
from neodragon_jax.pipelines.official import OfficialConfigMismatch  # noqa: E402
from neodragon_jax.pipelines.text_to_video import GenerationRequest, TextToVideoPipeline  # noqa: E402
from neodragon_jax.pyramid.sampler import sampling_keys, sampling_noise  # noqa: E402
from neodragon_jax.pyramid.scheduler import block_noise, make_schedule  # noqa: E402

pytestmark = [pytest.mark.needs_torch]

TOL = 1e-5  # text mirrors, max abs error float32

TEACHER = load_config("tiny")
NEODRAGON = dataclasses.replace(
    TEACHER,
    model=dataclasses.replace(
        TEACHER.model,
        text=dataclasses.replace(TEACHER.model.text, kind="neodragon"),  # DistilT5 64 -> CA -> width 64
        mmdit=dataclasses.replace(TEACHER.model.mmdit, context_in_dim=None),
        vae=dataclasses.replace(TEACHER.model.vae, decoder="light"),
    ),
)


def build(cfg, seed=0) -> TextToVideoPipeline:
    """A tiny pipeline with random non-zero weights (abstract build, numpy values: nothing to compile)."""

    def make(ctor, s):
        return random_weights(nnx.eval_shape(ctor), s)

    text = make(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(0)), seed)
    mmdit = make(lambda: PyramidMMDiT(cfg.model.mmdit, rngs=nnx.Rngs(0)), seed + 1)
    vae = make(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0)), seed + 2)
    return TextToVideoPipeline(cfg, TextTokenizers.for_config(cfg.model.text), text, mmdit, vae, random_weights=True)


@pytest.fixture(scope="module")
def pipelines():
    return {"teacher": build(TEACHER), "neodragon": build(NEODRAGON, seed=10)}


def _configs():
    return {"teacher": TEACHER, "neodragon": NEODRAGON}


def assert_same_params(a_mod, b_mod):
    a, b = param_arrays(a_mod), param_arrays(b_mod)
    assert set(a) == set(b)
    diff = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert diff == []


# ---- text mirrors -------------------------------------------------------------------------------------------


def test_text_wrappers_full_size_state_dicts(official_shapes):
    with torch.device("meta"):
        dt5, ca = DistilT5(DistilT5Config()), ContextAdapter(ContextAdapterConfig())
    assert {k: list(v.shape) for k, v in dt5.state_dict().items()} == official_shapes["distil_t5"]
    assert {k: list(v.shape) for k, v in ca.state_dict().items()} == official_shapes["context_adapter"]


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["teacher", "neodragon"])
def test_text_conditioner_matches_jax(pipelines, kind):
    p = pipelines[kind]
    mirror = to_mirror(p.text)
    tok = p.tokenizers(["a red ball bouncing on grass", ""])  # one padded prompt, one empty prompt
    ids = [np.asarray(a, np.int64) for a in (tok.t5_ids, tok.t5_mask, tok.clip_l_ids, tok.clip_g_ids)]
    got_tokens, _, got_pooled = nnx.jit(lambda m, *a: m(*a))(p.text, *map(jnp.asarray, ids))
    with torch.no_grad():
        want_tokens, _, want_pooled = mirror(*map(torch.from_numpy, ids))
    err_t = float(np.abs(np.asarray(got_tokens) - want_tokens.numpy()).max())
    err_p = float(np.abs(np.asarray(got_pooled) - want_pooled.numpy()).max())
    print(f"text ({kind}): tokens err {err_t:.3g} (max {want_tokens.abs().max():.3g}), pooled err {err_p:.3g}")
    assert want_tokens.abs().max() > 0.1 and want_pooled.abs().max() > 0.1
    assert err_t <= TOL and err_p <= TOL


# ---- folder round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["teacher", "neodragon"])
def test_folder_round_trip_is_bit_identical(pipelines, kind, tmp_path):
    p = pipelines[kind]
    out = jax_to_official_folder(p, tmp_path / "model")
    expected = {"causal_video_vae", "diffusion_transformer_320p", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3"} | ({"context_adapter"} if kind == "neodragon" else set())
    assert {f.name for f in out.iterdir()} == expected
    assert [f.name for f in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    for sub, weights in (("diffusion_transformer_320p", "diffusion_pytorch_model.safetensors"),
                         ("causal_video_vae", "diffusion_pytorch_model.safetensors"),
                         ("text_encoder", "model.safetensors"), ("text_encoder_3", "model.safetensors")):
        assert (out / sub / weights).is_file() and (out / sub / "config.json").is_file()
    dit = json.loads((out / "diffusion_transformer_320p" / "config.json").read_text())
    assert dit["num_layers"] == 4 and dit["attention_head_dim"] == 16
    assert dit["use_context_embedder"] == (kind == "teacher")
    # the official keys, including the derived sin-cos buffer
    tensors = read_safetensors(out / "diffusion_transformer_320p")
    assert "pos_embed.pos_embed" in tensors and "transformer_blocks.3.attn.to_out.0.weight" in tensors

    back = official_folder_to_jax(out, _configs()[kind])
    for comp in ("text", "mmdit", "vae"):
        assert_same_params(getattr(p, comp), getattr(back, comp))
    assert back.cfg.model.mmdit == p.cfg.model.mmdit and back.cfg.model.vae == p.cfg.model.vae


def test_folder_config_overrides_a_mismatched_base(pipelines, tmp_path):
    """The folder's config.json files decide the architecture, whatever the base config says."""
    p = pipelines["neodragon"]
    out = jax_to_official_folder(p, tmp_path / "model")
    wrong = dataclasses.replace(
        NEODRAGON,
        model=dataclasses.replace(
            NEODRAGON.model,
            mmdit=dataclasses.replace(NEODRAGON.model.mmdit, num_layers=7, head_dim=8),
            vae=dataclasses.replace(NEODRAGON.model.vae, decoder="native"),
        ),
    )
    cfg = config_from_official_folder(out, wrong)
    assert cfg.model == p.cfg.model
    # without reading the configs first, the loader refuses the contradiction and names every field
    with pytest.raises(OfficialConfigMismatch) as e:
        official_folder_to_jax(out, wrong, read_configs=False)
    assert [f[0] for f in e.value.fields] == ["model.mmdit.head_dim", "model.mmdit.num_layers", "model.vae.decoder"]
    assert "model.mmdit.num_layers is 7 in the config, 4 in diffusion_transformer_320p/config.json" in str(e.value)


def test_folder_loads_into_the_mirrors(pipelines, tmp_path):
    p = pipelines["neodragon"]
    out = jax_to_official_folder(p, tmp_path / "model")
    mirrors = official_folder_to_mirror(out, NEODRAGON)
    for comp in ("text", "mmdit", "vae"):
        want = to_mirror(getattr(p, comp)).state_dict()
        got = mirrors[comp].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_official_dtypes(pipelines, tmp_path):
    p = pipelines["neodragon"]
    out = jax_to_official_folder(p, tmp_path / "model", dtype="official")
    dtypes = {sub: {str(v.dtype) for v in read_safetensors(out / sub).values()}
              for sub in ("diffusion_transformer_320p", "causal_video_vae", "context_adapter", "text_encoder_3")}
    assert dtypes == {"diffusion_transformer_320p": {"bfloat16"}, "causal_video_vae": {"float16"},
                      "context_adapter": {"float32"}, "text_encoder_3": {"float16"}}
    back = official_folder_to_jax(out, NEODRAGON)
    a, b = param_arrays(p.mmdit), param_arrays(back.mmdit)
    assert all(b[k].dtype == np.float32 for k in b)
    # bf16 storage: relative rounding 2^-8
    assert all(np.allclose(a[k], b[k], rtol=2**-8, atol=1e-30) for k in a)


def test_existing_folder_is_kept_unless_overwrite(pipelines, tmp_path):
    p = pipelines["neodragon"]
    out = jax_to_official_folder(p, tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jax_to_official_folder(p, out)
    marker = out / "stale.txt"
    marker.write_text("old")
    jax_to_official_folder(p, out, overwrite=True)
    assert not marker.exists() and (out / "causal_video_vae").is_dir()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model"]


def test_exported_folder_is_readable_by_others(pipelines, tmp_path):
    """mkdtemp stages the folder as 0700 and mkstemp its files as 0600; under umask 022 the result must be
    what mkdir / open give: 0755 folders and 0644 files (issue 23 item 2)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = jax_to_official_folder(pipelines["neodragon"], tmp_path / "model")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["model"] == 0o755
    assert {k: oct(m) for k, m in modes.items() if m not in (0o755, 0o644)} == {}
    assert modes["model/causal_video_vae/config.json"] == 0o644
    assert modes["model/causal_video_vae/diffusion_pytorch_model.safetensors"] == 0o644


def test_failed_write_leaves_nothing(pipelines, tmp_path, monkeypatch):
    p = pipelines["neodragon"]
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(tensors, path, metadata)

    real = ec.write_safetensors
    monkeypatch.setattr(ec, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        jax_to_official_folder(p, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_bad_components_are_named(pipelines, tmp_path):
    p = pipelines["neodragon"]
    with pytest.raises(ValueError, match="text, mmdit, vae"):
        jax_to_official_folder({"text": p.text, "mmdit": p.mmdit}, tmp_path / "x")
    with pytest.raises(TypeError, match="TextConditioner"):
        jax_to_official_folder({"text": p.mmdit, "mmdit": p.mmdit, "vae": p.vae}, tmp_path / "x")


# ---- the whole pipeline, replayed in PyTorch ------------------------------------------------------------------------


def _down(x):
    """Per-frame bilinear x0.5 (= 2x2 mean), as the official history pyramid."""
    b, c, f, h, w = x.shape
    y = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), scale_factor=0.5, mode="bilinear",
                      align_corners=False)
    return y.reshape(b, f, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)


def _up(x):
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2)


# The random draws of the JAX run, jitted (eager JAX would compile every op of them one by one).
_sampling_noise = jax.jit(sampling_noise, static_argnums=(1, 2))
_block_noise = jax.jit(block_noise, static_argnums=(1, 2))


def torch_generate(p, text_m, mmdit_m, vae_m, req: GenerationRequest, full_prompt: str):
    """Spec §1.3 steps 3-8 in PyTorch with the mirrors; only the random draws come from the JAX run."""
    cfg = p.cfg
    sch = make_schedule(cfg.pyramid)
    S, C = sch.num_stages, cfg.model.mmdit.in_channels
    T, H, W = p.latent_shape(req.num_frames)

    def encode(prompt):
        tok = p.tokenizers([prompt])
        ids = (tok.t5_ids, tok.t5_mask, tok.clip_l_ids, tok.clip_g_ids)
        ids = [torch.from_numpy(np.asarray(a, np.int64)) for a in ids]
        return text_m(*ids)

    key = jax.random.key(req.seed)
    eps0 = torch.from_numpy(np.array(_sampling_noise(key, (1, C, T, H, W), sch)[0]))
    _, jump_key = sampling_keys(key)
    with torch.no_grad():
        cond, uncond = encode(full_prompt), encode(cfg.sampling.negative_prompt)
        text = [torch.cat([u, c]) for u, c in zip(uncond, cond)]  # CFG batch [uncond, cond]
        generated = []
        for u in range(T):
            steps = req.first_unit_steps if u == 0 else req.later_unit_steps
            w = req.cfg_scales[0] if u == 0 else req.cfg_scales[1]
            x = eps0[:, :, u : u + 1]
            for s in range(S):
                if s > 0:
                    shape = (1, C, 1, 2 * x.shape[3], 2 * x.shape[4])
                    noise = _block_noise(jax.random.fold_in(jump_key, u * S + s), shape, sch.gamma)
                    x = sch.jump_alpha[s] * _up(x) + sch.jump_beta[s] * torch.from_numpy(np.array(noise))
                # history (spec §3.5): unit j at distance d = u - j enters at stage max(s - d + 1, 0), one clip each
                hist = []
                for j in range(u):
                    z = generated[j]
                    for _ in range(S - 1 - max(s - (u - j) + 1, 0)):
                        z = _down(z)
                    hist.append(torch.cat([z, z]))
                ts, sig = sch.inference_timesteps(s, steps[s])
                for k in range(steps[s]):
                    v = mmdit_m(hist + [torch.cat([x, x])], *text, torch.full((2,), float(ts[k])))
                    x = x + float(sig[k + 1] - sig[k]) * (v[:1] + w * (v[1:] - v[:1]))
            generated.append(x)
        latents = torch.cat(generated, 2)
        c = cfg.model.vae.causal
        scale = torch.tensor([c.image_scale] + [c.video_scale] * (T - 1)).reshape(1, 1, T, 1, 1)
        shift = torch.tensor([c.image_shift] + [c.video_shift] * (T - 1)).reshape(1, 1, T, 1, 1)
        video = vae_m.decode(latents / scale + shift)
    return latents[0].numpy(), video[0].numpy()


@pytest.mark.slow
@pytest.mark.parity
def test_generate_replayed_in_pytorch():
    """``neodragon generate`` on a tiny Neodragon pipeline (DistilT5 + ContextAdapter, light decoder; CFG on,
    3 stages, 2 latent units) against the PyTorch replay: every model call, history pyramid, Euler step and
    the decoder run in PyTorch. Two MMDiT blocks keep the JAX compile time of the 6 (unit, stage) steps low."""
    mmdit = dataclasses.replace(NEODRAGON.model.mmdit, num_layers=2)
    cfg = dataclasses.replace(NEODRAGON, model=dataclasses.replace(NEODRAGON.model, mmdit=mmdit))
    p = build(cfg, seed=20)
    req = GenerationRequest("a red ball bouncing", seed=3, num_frames=9, first_unit_steps=(2, 2, 2),
                            later_unit_steps=(1, 1, 1), cfg_scales=(7.0, 5.0))
    out = p.generate(req)
    video_jax = np.asarray(p.decode(jnp.asarray(out.latents)[None]))[0]

    text_m, mmdit_m, vae_m = to_mirror(p.text), to_mirror(p.mmdit), to_mirror(p.vae)
    # align the one float32 table whose exp() rounding differs between XLA-CPU and torch (see
    # test_mirror_mmdit.test_timestep_sinusoid)
    freqs = np.array(jnp.exp(-math.log(10000.0) * jnp.arange(128, dtype=jnp.float32) / 128))
    mmdit_m.time_text_embed.timestep_freqs.copy_(torch.from_numpy(freqs))
    latents, video = torch_generate(p, text_m, mmdit_m, vae_m, req, out.full_prompt)

    err_lat = float(np.abs(latents - out.latents).max())
    err_vid = float(np.abs(video - video_jax).max())
    frames = np.clip(video * 127.5 + 127.5, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)
    err_u8 = int(np.abs(frames.astype(int) - out.frames.astype(int)).max())
    print(f"replay: latents err {err_lat:.3g} (max {np.abs(out.latents).max():.3g}), video err {err_vid:.3g} "
          f"(max {np.abs(video_jax).max():.3g}), uint8 max diff {err_u8}, nfe {out.nfe}")
    assert out.nfe == (6 + 3) * 2 and frames.shape == out.frames.shape == (9, 64, 64, 3)
    assert np.abs(out.latents).max() > 1.0 and np.abs(video_jax).max() > 0.5
    assert err_lat <= 1e-4 and err_vid <= 2e-5 and err_u8 <= 1
