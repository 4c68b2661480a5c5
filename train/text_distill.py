"""``text-distill``: prompt-only text-encoder distillation (Neodragon's first technique, spec §4.4).

The teacher's text tokens are the DiT's own: ``t = CE(T5(p))``, the frozen teacher text encoder followed by the
frozen teacher MMDiT's ``context_embedder``. The student predicts them from the prompt alone; the loss over
the valid (unpadded) tokens of a batch is ``w_mse * mean ||t - t^||^2 / D + w_cd * mean (1 - cos(t, t^))``
(spec defaults 1.0 / 0.1; the MSE is the per-element mean, as ``F.mse_loss``; both means run over every
valid token of the batch, in float32).

Modes (``stages.text-distill.mode``; roles in brackets, F = frozen, T = trained):

=================  ======================================  ===============================================
``replace``        ``t^ = CA(DT5(p))``: the ContextAdapter  [t5 F, embedder F, dt5 F, adapter T] (the paper's
                   replaces the CE (default, chosen)        choice; the CA outputs the MMDiT width)
``extend``         ``t^ = CE(CA(DT5(p)))``: the CA output   [t5 F, embedder F, dt5 F, adapter T] (CA width:
                   goes through the frozen CE               T5 -> T5)
``lora``           ``t^ = CE(DT5_LoRA(p))``: LoRA on DT5,   [t5 F, embedder F, dt5 F, lora T]
                   no CA
``train-dt5``      as ``replace``, DT5 trained too          [t5 F, embedder F, dt5 T, adapter T]
``pretrain-dt5``   ``DT5(p)`` against ``T5(p)`` itself, no  [t5 F, dt5 T]: the tiny world's stand-in for the
                   CE                                       pretrained DT5 of DistillT5 (T5-XXL -> T5-base in
                                                            T5 space); the other modes start from it
=================  ======================================  ===============================================

Teacher T5 and CE are frozen roles (never donated, never checkpointed), loaded from ``teacher_init``
(default ``release:tiny-teacher``: the shipped teacher's ``text_encoder_3`` and the ``context_embedder``
tensors of its ``diffusion_transformer_*``). Random initialisation of ``t5``, ``embedder`` and ``dt5`` is
keyed by the role's name (not its position), so every mode and the target cache see the same random towers.

Data: ``data.path`` is a prompt corpus (``neodragon_jax.data.prompts``: ``neodragon text-distill corpus``).
Examples are the training prompts as the pipeline encodes them (``prompt + model.text.prompt_modifier``),
plus the negative prompt (``sampling.negative_prompt``, the CFG branch) for ``negative_fraction`` of the
examples. Targets are computed in the step (``targets="online"``) or read from a pre-extracted cache
(``targets="cache"``: :func:`build_target_cache`, resumable, keyed by everything it depends on); with the
cache the teacher T5 is not even built. Batch: ``ids``, ``mask`` ``[B, S]`` int32 (+ ``target [B, S, D]``).

Every mode's student has an official Neodragon form (:func:`neodragon_form`: ``text_encoder_3`` = DT5,
``context_adapter`` = a CA at the MMDiT width): ``extend`` folds the CE into the CA's output layer (two
linear maps in a row), ``lora`` merges the LoRA into DT5 and writes the CE as a CA whose only path is the
input skip. Evaluation and export (``neodragon text-distill eval|export``) use that form with the teacher
MMDiT minus its CE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.data.video_folder import DatasetError
from neodragon_jax.layers.core import as_dtype
from neodragon_jax.models.lora import LoRA, apply_lora, lora_targets
from neodragon_jax.models.text.context_adapter import ContextAdapter
from neodragon_jax.models.text.context_embedder import ContextEmbedder
from neodragon_jax.models.text.distil_t5 import DistilT5
from neodragon_jax.models.text.t5 import T5Encoder
from train import registry  # noqa: F401 - registers every stage's settings (a run's config.json names them)
from train.roles import Frozen, Models, RoleStage, Trained

NAME = "text-distill"
MODES = ("replace", "extend", "lora", "train-dt5", "pretrain-dt5")
#: Name-keyed random init of the towers (folded into ``key(train.seed)``): the same in every mode and cache.
ROLE_SEEDS = {"t5": 1001, "embedder": 1002, "dt5": 1003}
CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}


@dataclasses.dataclass(frozen=True)
class TextDistillSettings:
    mode: Literal["replace", "extend", "lora", "train-dt5", "pretrain-dt5"] = "replace"
    w_mse: float = 1.0
    w_cd: float = 0.1
    # Weight sources (train/weights.py). The teacher's T5 (text_encoder_3) and CE (the context_embedder tensors
    # of its diffusion_transformer_* folder); embedder_init "" = teacher_init.
    teacher_init: str = "release:tiny-teacher"
    embedder_init: str = ""
    dt5_init: str = "random"
    adapter_init: str = "random"
    lora_rank: int = 8
    lora_alpha: float = 0.0  # 0 = rank (scale 1)
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "wi_0", "wi_1", "wo", "final_projection")
    lr: float = 0.0  # the trained roles' learning rate; 0 = optim.lr
    ema: float = -1.0  # the trained roles' EMA decay; < 0 = optim.ema_decay
    targets: Literal["online", "cache"] = "online"
    cache_dir: str = ""  # "" = <corpus folder>/targets-<key digest>
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    cache_chunk: int = 512  # prompts per teacher call and per cache file
    negative_fraction: float = 0.01  # extra examples of the negative prompt, as a fraction of the prompts


class CacheError(DatasetError):
    """A target cache that does not belong to this run (its key differs) or cannot be read; one line."""


# ---------------------------------------------------------------------------------------------- the loss
def distill_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, w_mse: float, w_cd: float):
    """``(w_mse * mse + w_cd * cos_dist, metrics)`` over the tokens where ``mask`` is nonzero, in float32.

    ``pred``/``target`` ``[B, S, D]``, ``mask`` ``[B, S]``. ``mse`` = mean over valid tokens of the mean over
    ``D`` of the squared error; ``cos_dist`` = mean over valid tokens of ``1 - cos``. Padded tokens enter
    neither term (nor their gradients).
    """
    p = pred.astype(jnp.float32)
    t = target.astype(jnp.float32)
    m = (mask != 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    p = jnp.where(m[..., None] > 0, p, 0.0)  # a padded row's values (even inf/nan) reach nothing
    t = jnp.where(m[..., None] > 0, t, 0.0)
    se = jnp.mean(jnp.square(p - t), axis=-1)
    dot = jnp.sum(p * t, axis=-1)
    norms = jnp.sqrt(jnp.sum(p * p, axis=-1) * jnp.sum(t * t, axis=-1))
    cos = dot / jnp.maximum(norms, 1e-8)
    mse = jnp.sum(se * m) / n
    cos_mean = jnp.sum(cos * m) / n
    cd = 1.0 - cos_mean
    loss = w_mse * mse + w_cd * cd
    return loss, {"mse": mse, "cos": cos_mean, "cos_dist": cd}


def t5_tokenize(tokenizers, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """T5 ids and mask ``[N, max_length]`` int32, exactly as ``TextTokenizers`` makes them."""
    out = tokenizers.t5(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    return np.asarray(out.input_ids, np.int32), np.asarray(out.attention_mask, np.int32)


def full_prompt(cfg: Config, prompt: str) -> str:
    """The prompt as the pipeline encodes it (``TextToVideoPipeline.full_prompt``)."""
    return prompt + cfg.model.text.prompt_modifier if prompt else prompt


@dataclasses.dataclass
class PromptData:
    """The stage's example rows: tokenised training prompts, then the negative prompt (if used)."""

    corpus: Any
    prompts: list[str]  # full prompts, one per row
    ids: np.ndarray
    mask: np.ndarray
    num_train: int  # rows [0, num_train) are training prompts; row num_train the negative prompt
    num_examples: int
    cache: "TargetCache | None" = None

    def row(self, index: int) -> int:
        return int(index) if index < self.num_train else self.num_train


# ---------------------------------------------------------------------------------------------- the stage
class TextDistill(RoleStage):
    name = NAME
    settings_class = TextDistillSettings

    def __init__(self, cfg: Config, **_):
        self.settings = s = cfg.stages.get_settings(self.name)
        if s.w_mse < 0 or s.w_cd < 0 or s.w_mse + s.w_cd == 0:
            raise ValueError(f"stages.{NAME}: w_mse={s.w_mse}, w_cd={s.w_cd}: both >= 0 and not both 0")
        if not 0.0 <= s.negative_fraction < 1.0:
            raise ValueError(f"stages.{NAME}.negative_fraction must be in [0, 1), got {s.negative_fraction}")
        if s.lora_rank < 1 or s.cache_chunk < 1:
            raise ValueError(f"stages.{NAME}: lora_rank and cache_chunk must be >= 1")
        self.dims(cfg)  # refuse inconsistent widths before anything is built
        self._data: PromptData | None = None

    # -- widths ----------------------------------------------------------------------------------------
    def dims(self, cfg: Config) -> dict[str, int]:
        """``t5`` (teacher token width), ``hidden`` (CE output = MMDiT width), ``proj`` (DT5 output),
        ``target`` (width of what the loss compares) and ``adapter_out``; inconsistent widths raise."""
        text, mode = cfg.model.text, self.settings.mode
        t5, hidden, proj = text.t5.d_model, cfg.model.mmdit.hidden_size, text.distil_t5.projection_dim
        cin = cfg.model.mmdit.context_in_dim
        if cin is not None and cin != t5:
            raise ValueError(f"model.mmdit.context_in_dim={cin} but the teacher T5 is {t5} wide: the CE maps the T5 "
                             f"tokens, so they must agree")
        if mode in ("lora", "pretrain-dt5") and proj != t5:
            raise ValueError(f"mode {mode!r} compares DT5's output with T5 tokens (through the CE for lora): "
                             f"model.text.distil_t5.projection_dim={proj} must equal model.text.t5.d_model={t5}")
        if mode in ("replace", "extend", "train-dt5") and proj != text.context_adapter.in_dim:
            raise ValueError(f"model.text.distil_t5.projection_dim={proj} must equal "
                             f"model.text.context_adapter.in_dim={text.context_adapter.in_dim}")
        return {"t5": t5, "hidden": hidden, "proj": proj, "target": t5 if mode == "pretrain-dt5" else hidden,
                "adapter_out": t5 if mode == "extend" else hidden}

    # -- roles -----------------------------------------------------------------------------------------
    @staticmethod
    def _kw(cfg: Config) -> dict:
        return dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))

    @staticmethod
    def _named_rngs(cfg: Config, role: str) -> nnx.Rngs:
        return nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.train.seed), ROLE_SEEDS[role]))

    def _t5(self, cfg, rngs):
        return T5Encoder(cfg.model.text.t5, rngs=self._named_rngs(cfg, "t5"), **self._kw(cfg))

    def _embedder(self, cfg, rngs):
        return ContextEmbedder(cfg.model.text.t5.d_model, cfg.model.mmdit.hidden_size,
                               rngs=self._named_rngs(cfg, "embedder"), **self._kw(cfg))

    def _dt5(self, cfg, rngs):
        # The stage runs DT5 as the pipeline does, dropout off (the layers are built in inference mode and never
        # switched on). Rates of zero keep an unused RNG stream out of the role's state: a key has no bytes that
        # a plan or a checkpoint could count, and the parameters (the official keys) are the same.
        dt5 = cfg.model.text.distil_t5
        dt5 = dataclasses.replace(dt5, head_dropout=0.0, body=dataclasses.replace(dt5.body, dropout_rate=0.0))
        return DistilT5(dt5, rngs=self._named_rngs(cfg, "dt5"), **self._kw(cfg))

    def _adapter(self, cfg, rngs):
        return ContextAdapter(cfg.model.text.context_adapter, rngs=rngs, **self._kw(cfg))

    def _lora(self, cfg, rngs):
        base = nnx.eval_shape(lambda: DistilT5(cfg.model.text.distil_t5, rngs=nnx.Rngs(0), **self._kw(cfg)))
        targets = lora_targets(base, self.settings.lora_targets)
        if not targets:
            raise ValueError(f"stages.{NAME}.lora_targets {list(self.settings.lora_targets)} match no DT5 kernel")
        return LoRA(targets, self.settings.lora_rank, self.settings.lora_alpha or None,
                    param_dtype=as_dtype(cfg.precision.param_dtype), rngs=rngs)

    def needs_teacher_t5(self) -> bool:
        return self.settings.targets == "online"

    def needs_embedder(self) -> bool:
        mode = self.settings.mode
        return mode in ("extend", "lora") or (mode != "pretrain-dt5" and self.needs_teacher_t5())

    def roles(self, cfg: Config):
        s = self.settings
        train_kw = dict(optim={"lr": s.lr} if s.lr > 0 else None, ema=s.ema if s.ema >= 0 else None)
        out = {}
        if self.needs_teacher_t5():
            out["t5"] = Frozen(self._t5, init=s.teacher_init)
        if self.needs_embedder():
            out["embedder"] = Frozen(self._embedder, init=s.embedder_init or s.teacher_init)
        if s.mode in ("train-dt5", "pretrain-dt5"):
            out["dt5"] = Trained(self._dt5, init=s.dt5_init, **train_kw)
        else:
            out["dt5"] = Frozen(self._dt5, init=s.dt5_init)
        if s.mode in ("replace", "extend", "train-dt5"):
            out_dim = self.dims(cfg)["adapter_out"]
            out["adapter"] = Trained(self._adapter, overrides=(f"model.text.context_adapter.out_dim={out_dim}",),
                                     init=s.adapter_init, **train_kw)
        if s.mode == "lora":
            out["lora"] = Trained(self._lora, **train_kw)
        return out

    # -- the computation -------------------------------------------------------------------------------
    def student_tokens(self, m: Mapping[str, nnx.Module], ids: jax.Array, mask: jax.Array) -> jax.Array:
        """The student's tokens in the target space (the CE's output, or T5's for ``pretrain-dt5``)."""
        mode = self.settings.mode
        if mode == "lora":
            return m["embedder"](apply_lora(m["dt5"], m["lora"])(ids, mask))
        h = m["dt5"](ids, mask)
        if mode == "pretrain-dt5":
            return h.astype(jnp.float32)
        h = m["adapter"](h)
        return m["embedder"](h) if mode == "extend" else h.astype(jnp.float32)

    def teacher_tokens(self, m: Mapping[str, nnx.Module], ids: jax.Array, mask: jax.Array) -> jax.Array:
        """``CE(T5(p))`` (``T5(p)`` for ``pretrain-dt5``), float32."""
        t = m["t5"](ids, mask)
        return t.astype(jnp.float32) if self.settings.mode == "pretrain-dt5" else m["embedder"](t)

    def loss(self, trainable, frozen, batch, rng):
        m = Models({**frozen, **trainable})
        pred = self.student_tokens(m, batch["ids"], batch["mask"])
        target = batch["target"] if "target" in batch else self.teacher_tokens(m, batch["ids"], batch["mask"])
        return distill_loss(pred, jax.lax.stop_gradient(target), batch["mask"], self.settings.w_mse,
                            self.settings.w_cd)

    # -- batch -----------------------------------------------------------------------------------------
    def example_batch(self, cfg: Config, global_batch: int):
        s = cfg.model.text.max_length
        out = {"ids": jax.ShapeDtypeStruct((global_batch, s), jnp.int32),
               "mask": jax.ShapeDtypeStruct((global_batch, s), jnp.int32)}
        if self.settings.targets == "cache":
            out["target"] = jax.ShapeDtypeStruct((global_batch, s, self.dims(cfg)["target"]),
                                                 _storage_dtype(self.settings.cache_dtype))
        return out

    def batch_logical_axes(self, cfg: Config):
        out = {"ids": ("batch", "length"), "mask": ("batch", "length")}
        if self.settings.targets == "cache":
            out["target"] = ("batch", "length", None)
        return out

    def tokens_per_example(self, cfg: Config) -> int:
        return cfg.model.text.max_length

    # -- data ------------------------------------------------------------------------------------------
    def prompt_data(self, cfg: Config, *, with_cache: bool = True) -> PromptData:
        """The corpus of ``data.path``, tokenised once (and the target cache, built or resumed if needed)."""
        if self._data is None:
            from neodragon_jax.data.prompts import CorpusError, load_corpus
            from neodragon_jax.models.text.tokenizers import TextTokenizers

            if not cfg.data.path:
                raise CorpusError(f"stage {NAME} reads its prompts from data.path: a corpus folder (`neodragon "
                                  f"text-distill corpus` writes one), a prompt file or a captions.jsonl folder")
            corpus = load_corpus(cfg.data.path)
            prompts = [full_prompt(cfg, p) for p in corpus.train]
            n = len(prompts)
            frac = self.settings.negative_fraction
            extra = int(math.ceil(frac * n)) if frac > 0 else 0
            if extra:
                prompts.append(cfg.sampling.negative_prompt)
            tok = TextTokenizers.for_config(cfg.model.text)
            ids, mask = [], []
            for i in range(0, len(prompts), 4096):
                a, b = t5_tokenize(tok, prompts[i:i + 4096], cfg.model.text.max_length)
                ids.append(a)
                mask.append(b)
            self._data = PromptData(corpus, prompts, np.concatenate(ids), np.concatenate(mask), n, n + extra)
        if with_cache and self.settings.targets == "cache" and self._data.cache is None:
            self._data.cache = build_target_cache(self, cfg)
        return self._data

    def num_examples(self, cfg: Config) -> int:
        return self.prompt_data(cfg).num_examples

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        d = self.prompt_data(cfg)
        r = d.row(index)
        out = {"ids": d.ids[r], "mask": d.mask[r]}
        if d.cache is not None:
            out["target"] = d.cache.row(r)
        return out

    def preflight(self, cfg: Config) -> list[str]:
        """What ``train --dry-run`` can find wrong without reading a weight: a named target cache that is not
        there (the default cache folder is keyed on the teacher's weights, so only a run can look for it)."""
        s = self.settings
        if s.targets == "cache" and s.cache_dir and not (Path(s.cache_dir) / MANIFEST).is_file():
            return [f"stages.text-distill.cache_dir {s.cache_dir!r} holds no target cache ({MANIFEST}): write it "
                    f"with `neodragon text-distill cache` first"]
        return []

    def data_description(self, cfg: Config) -> str:
        s = self.settings
        where = "computed online" if s.targets == "online" else f"from the cache ({s.cache_dir or 'beside the corpus'})"
        return f"prompt corpus {cfg.data.path or '(data.path unset)'}, mode {s.mode}, teacher targets {where}"


# ------------------------------------------------------------------------------------------ helpers
def _storage_dtype(name: str):
    if name == "bfloat16":
        return jnp.bfloat16
    return np.dtype(CACHE_DTYPES[name])


def with_settings(cfg: Config, **changes) -> Config:
    """``cfg`` with the stage's settings changed."""
    s = dataclasses.replace(cfg.stages.get_settings(NAME), **changes)
    return dataclasses.replace(cfg, stages=cfg.stages.with_settings(NAME, s))


def teacher_config(cfg: Config) -> Config:
    """The config whose frozen roles are exactly the teacher (targets computed online; the student's own
    sources reset to random so that building the teacher never reads them)."""
    keep = ("t5=", "embedder=")
    cfg = with_settings(cfg, targets="online", dt5_init="random", adapter_init="random")
    role_init = tuple(e for e in cfg.train.role_init if str(e).replace(" ", "").startswith(keep))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, role_init=role_init))


def teacher_function(cfg: Config, mesh=None) -> tuple[Callable[[np.ndarray, np.ndarray], jax.Array], Any]:
    """``(fn(ids, mask) -> targets [N, S, D] float32, setup)``: the frozen teacher of ``cfg``'s stage loaded
    from its sources, sharded on ``mesh`` (default ``cfg.mesh``), jitted."""
    from neodragon_jax.sharding import make_mesh
    from train.state import build_setup

    tcfg = teacher_config(cfg)
    stage = TextDistill(tcfg)
    setup = build_setup(stage, tcfg, mesh if mesh is not None else make_mesh(tcfg.mesh))
    frozen = setup.init_frozen()

    @jax.jit
    def fn(fr, ids, mask):
        return stage.teacher_tokens(setup.frozen_modules(fr), ids, mask)

    def call(ids, mask):
        with jax.set_mesh(setup.mesh):
            return fn(frozen, jnp.asarray(ids), jnp.asarray(mask))

    return call, setup


# ---------------------------------------------------------------------------------------- target cache
MANIFEST = "manifest.json"


def _source_fingerprint(spec: str) -> Any:
    """What a weight source's numbers depend on: a release's recorded file hashes, an official folder's file
    sizes and times, a run's latest step; the spec itself otherwise."""
    from train.weights import checkpoints_folder, parse_source

    src = parse_source(spec)
    if src.kind == "release":
        from neodragon_jax.releases import RELEASES_DIR, RECORD

        rec = RELEASES_DIR / src.path / RECORD
        return {"spec": str(src), "files": json.loads(rec.read_text()).get("files") if rec.is_file() else None}
    if src.kind in ("official", "npz"):
        p = Path(src.path)
        files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
        return {"spec": str(src), "files": {str(f.relative_to(p) if p.is_dir() else f.name): [f.stat().st_size,
                                            int(f.stat().st_mtime)] for f in files if f.is_file()}}
    if src.kind == "run":
        folder = checkpoints_folder(src.path)
        steps = sorted(int(q.name) for q in folder.iterdir() if q.name.isdigit()) if folder.is_dir() else []
        return {"spec": str(src), "step": src.step if src.step is not None else (steps[-1] if steps else None)}
    return {"spec": str(src)}


def cache_key(stage: TextDistill, cfg: Config, data: PromptData) -> dict:
    """Everything the cached targets depend on."""
    from train.roles import role_overrides

    tcfg = teacher_config(cfg)
    tstage = TextDistill(tcfg)
    roles = {n: r for n, r in tstage.roles(tcfg).items() if n in ("t5", "embedder")}
    inits = role_overrides(tcfg, roles)
    text = cfg.model.text
    h = hashlib.sha256()
    h.update(data.ids[: data.num_train + (data.num_examples > data.num_train)].tobytes())
    return {
        "format": 1,
        "space": "t5" if stage.settings.mode == "pretrain-dt5" else "context_embedder",
        "teacher": {n: _source_fingerprint(str(src)) for n, src in inits.items()},
        "t5": dataclasses.asdict(text.t5),
        "hidden": cfg.model.mmdit.hidden_size,
        "precision": dataclasses.asdict(cfg.precision),
        "seed": cfg.train.seed if any(s.kind == "random" for s in inits.values()) else None,
        "max_length": text.max_length,
        "tokens_sha256": h.hexdigest(),
        "rows": data.num_train + int(data.num_examples > data.num_train),
        "dtype": stage.settings.cache_dtype,
        "chunk": stage.settings.cache_chunk,
    }


def _key_digest(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(stage: TextDistill, cfg: Config, key: Mapping) -> Path:
    if stage.settings.cache_dir:
        return Path(stage.settings.cache_dir)
    base = Path(cfg.data.path)
    base = base if base.is_dir() else base.parent
    return base / f"targets-{_key_digest(key)}"


class TargetCache:
    """Pre-extracted teacher targets: ``manifest.json`` + ``targets-NNNNN.npy`` ``[chunk, S, D]`` per chunk of
    example rows (padded tokens stored as zeros; bfloat16 stored as its uint16 bits)."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.chunk = int(manifest["key"]["chunk"])
        self.rows = int(manifest["key"]["rows"])
        self.dtype = manifest["key"]["dtype"]
        self._maps: dict[int, np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk)

    @property
    def done(self) -> list[int]:
        return sorted(self.manifest["chunks_done"])

    @property
    def complete(self) -> bool:
        return set(self.done) == set(range(self.num_chunks))

    def chunk_path(self, c: int) -> Path:
        return self.folder / f"targets-{c:05d}.npy"

    def _map(self, c: int) -> np.ndarray:
        if c not in self._maps:
            try:
                arr = np.load(self.chunk_path(c), mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CacheError(f"{self.chunk_path(c)}: cannot read this cache file ({e}); delete {self.folder} "
                                 f"to rebuild the cache") from None
            if self.dtype == "bfloat16":
                import ml_dtypes

                arr = arr.view(ml_dtypes.bfloat16)
            self._maps[c] = arr
        return self._maps[c]

    def row(self, r: int) -> np.ndarray:
        c, o = divmod(int(r), self.chunk)
        return np.array(self._map(c)[o])


def _write_manifest(folder: Path, manifest: Mapping) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)


def build_target_cache(stage: TextDistill, cfg: Config, *, mesh=None, say: Callable[[str], None] = print,
                       max_chunks: int | None = None, teacher: Callable | None = None) -> TargetCache:
    """Pre-extract the teacher targets of every example row of ``stage``'s corpus into its cache folder, or
    resume an interrupted extraction (chunks are written atomically and listed in the manifest once
    complete). A folder whose key differs is refused, naming the differing keys. ``max_chunks``: stop after
    that many new chunks (tests; the cache stays resumable)."""
    data = stage.prompt_data(cfg, with_cache=False)
    key = json.loads(json.dumps(cache_key(stage, cfg, data), default=str))
    folder = cache_folder(stage, cfg, key)
    path = folder / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except ValueError as e:
            raise CacheError(f"{path}: not valid JSON ({e}); delete {folder} to rebuild the cache") from None
        if manifest.get("key") != key:
            from train.recipe import describe_changes

            diff = describe_changes({"key": manifest.get("key")}, {"key": key})
            raise CacheError(f"the target cache {folder} was built for other settings ({'; '.join(diff[:6])}); "
                             f"delete it or set stages.{NAME}.cache_dir to another folder")
    else:
        if teacher is None:  # a teacher that cannot be loaded leaves no empty cache folder behind
            teacher, _ = teacher_function(cfg, mesh)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"key": key, "chunks_done": [], "prompts": data.prompts[: key["rows"]][:3]}
        _write_manifest(folder, manifest)
    cache = TargetCache(folder, manifest)
    todo = [c for c in range(cache.num_chunks) if c not in set(cache.done)]
    if not todo:
        return cache
    say(f"[{NAME}] teacher targets: {len(todo)} of {cache.num_chunks} chunks of {cache.chunk} prompts to extract "
        f"into {folder}" + (" (resuming)" if cache.done else ""))
    if teacher is None:
        teacher, _ = teacher_function(cfg, mesh)
    for k, c in enumerate(todo):
        if max_chunks is not None and k >= max_chunks:
            break
        lo, hi = c * cache.chunk, min((c + 1) * cache.chunk, cache.rows)
        ids = np.zeros((cache.chunk, data.ids.shape[1]), np.int32)
        mask = np.zeros_like(ids)
        ids[: hi - lo], mask[: hi - lo] = data.ids[lo:hi], data.mask[lo:hi]
        out = np.asarray(jax.device_get(teacher(ids, mask)), np.float32)[: hi - lo]
        out = out * (mask[: hi - lo, :, None] != 0)
        if cache.dtype == "bfloat16":
            import ml_dtypes

            stored = out.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            stored = out.astype(CACHE_DTYPES[cache.dtype])
        tmp = folder / f".targets-{c:05d}.tmp.npy"
        np.save(tmp, stored)
        os.replace(tmp, cache.chunk_path(c))
        manifest["chunks_done"] = sorted(set(manifest["chunks_done"]) | {c})
        _write_manifest(folder, manifest)
    return TargetCache(folder, manifest)


# ------------------------------------------------------------------------------------- restoring a run
@dataclasses.dataclass
class DistilledRun:
    """A text-distill run restored: its config (targets online), stage, the modules of every role by name
    (trained ones from the checkpoint, EMA weights when it kept them and ``use_ema``) and the step."""

    cfg: Config
    stage: TextDistill
    models: dict[str, nnx.Module]
    step: int
    folder: Path
    weights: str  # "ema" | "raw"


def read_run_config(run_dir: str | os.PathLike) -> Config:
    from neodragon_jax.config import from_json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: no config.json in it")
    cfg = from_json(path.read_text())
    if cfg.train.stage != NAME:
        raise ValueError(f"{run_dir} is a run of stage {cfg.train.stage!r}, not {NAME!r}")
    return cfg


def load_run(run_dir: str | os.PathLike, *, use_ema: bool = True, mesh=None, overrides: Sequence[str] = ()
             ) -> DistilledRun:
    """Restore a run's latest checkpoint beside its frozen roles (the teacher included, targets online)."""
    import logging

    from neodragon_jax.config import apply_overrides
    from neodragon_jax.sharding import make_mesh
    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir
    from train.state import build_setup

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    cfg = with_settings(apply_overrides(cfg, overrides) if overrides else cfg, targets="online")
    stage = TextDistill(cfg)
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    setup = build_setup(stage, cfg, mesh)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    ck = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint, read_only=True)
    try:
        step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(cfg)}")
        state, _, _ = ck.restore(step, setup.abstract_state)
    finally:
        ck.close()
        absl.setLevel(level)
    params = dict(state["params"])
    weights = "raw"
    if use_ema and state.get("ema"):
        params.update(state["ema"])
        weights = "ema"
    models = dict(setup.frozen_modules(setup.init_frozen()))
    models.update(setup.modules(params, state["model_state"]))
    return DistilledRun(cfg, stage, models, int(step), run_dir, weights)


# -------------------------------------------------------------------------------------- evaluation
def token_metrics(stage: TextDistill, models: Mapping[str, nnx.Module], cfg: Config, prompts: Sequence[str], *,
                  batch: int = 64) -> dict:
    """Student against teacher tokens on ``prompts`` (as the pipeline encodes them): the mean over valid tokens
    of the per-element MSE and of the cosine, the worst prompt's mean cosine, and per-prompt cosines."""
    from neodragon_jax.models.text.tokenizers import TextTokenizers

    if not prompts:
        raise ValueError("no prompts to evaluate")
    tok = TextTokenizers.for_config(cfg.model.text)
    graphdef, state = nnx.split(dict(models))

    @jax.jit
    def fn(state, ids, mask):
        m = nnx.merge(graphdef, state)
        p = stage.student_tokens(m, ids, mask)
        t = stage.teacher_tokens(m, ids, mask)
        w = (mask != 0).astype(jnp.float32)
        se = jnp.mean(jnp.square(p - t), -1)
        cos = jnp.sum(p * t, -1) / jnp.maximum(jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-8)
        return jnp.sum(se * w, -1), jnp.sum(cos * w, -1), jnp.sum(w, -1)

    se_sum, cos_sum, count = [], [], []
    full = [full_prompt(cfg, p) for p in prompts]
    for i in range(0, len(full), batch):
        chunk = full[i:i + batch]
        ids, mask = t5_tokenize(tok, chunk + [""] * (batch - len(chunk)), cfg.model.text.max_length)
        a, b, c = jax.device_get(fn(state, ids, mask))
        se_sum.append(a[: len(chunk)])
        cos_sum.append(b[: len(chunk)])
        count.append(c[: len(chunk)])
    se, cs, n = (np.concatenate(x).astype(np.float64) for x in (se_sum, cos_sum, count))
    per_prompt = cs / np.maximum(n, 1)
    return {"prompts": len(prompts), "tokens": int(n.sum()), "mse": float(se.sum() / n.sum()),
            "cos": float(cs.sum() / n.sum()), "cos_worst_prompt": float(per_prompt.min()),
            "cos_per_prompt": [float(x) for x in per_prompt]}


# ------------------------------------------------------------------------------- the Neodragon form
def _linear(module: nnx.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    k = np.asarray(jax.device_get(module.kernel.get_value()), np.float64)
    b = module.bias.get_value() if module.bias is not None else None
    return k, None if b is None else np.asarray(jax.device_get(b), np.float64)


def neodragon_form(stage: TextDistill, models: Mapping[str, nnx.Module], cfg: Config):
    """``(DistilT5, ContextAdapter, text config of kind 'neodragon')``: the student as the official Neodragon
    layout holds it (``text_encoder_3`` + ``context_adapter`` at the MMDiT width, no CE), whatever the mode."""
    from neodragon_jax.convert.io import assign_params, param_arrays

    mode = stage.settings.mode
    text = cfg.model.text
    d = stage.dims(cfg)
    ca_cfg = dataclasses.replace(text.context_adapter, in_dim=d["proj"], out_dim=d["hidden"])
    neo = dataclasses.replace(text, kind="neodragon", context_adapter=ca_cfg)
    dt5 = apply_lora(models["dt5"], models["lora"]) if mode == "lora" else models["dt5"]
    if mode in ("replace", "train-dt5"):
        return dt5, models["adapter"], neo
    kw = TextDistill._kw(cfg)
    ca = ContextAdapter(ca_cfg, rngs=nnx.Rngs(0), **kw)
    arrays = {k: np.zeros_like(v) for k, v in param_arrays(ca).items()}
    last = len(ca.network_layers) - 1
    w_ce, b_ce = _linear(models["embedder"].context_embedder) if "embedder" in models else (None, None)
    if mode == "extend":
        src = models["adapter"]
        arrays.update({k: v for k, v in param_arrays(src).items() if not k.startswith(f"network_layers.{last}.")})
        w, b = _linear(src.network_layers[last])
        arrays[f"network_layers.{last}.kernel"] = w @ w_ce
        arrays[f"network_layers.{last}.bias"] = b @ w_ce + b_ce
    else:  # lora, pretrain-dt5: the CE (or, without one, the identity) as the CA's input-skip path only
        if w_ce is None:
            if d["proj"] != d["hidden"]:
                raise ValueError("pretrain-dt5 without a CE has no Neodragon form: DT5 and the MMDiT widths differ")
            w_ce, b_ce = np.eye(d["proj"]), np.zeros(d["hidden"])
        kernel = np.zeros((d["proj"] + ca_cfg.hidden_dim, d["hidden"]))
        kernel[: d["proj"]] = w_ce
        arrays[f"network_layers.{last}.kernel"] = kernel
        arrays[f"network_layers.{last}.bias"] = b_ce
    assign_params(ca, {k: np.asarray(v, np.float32) for k, v in arrays.items()})
    return dt5, ca, neo


def text_costs(cfg: Config, neo_text=None) -> dict[str, dict]:
    """Parameters and FLOPs per prompt (XLA cost analysis, batch 1 at ``max_length`` tokens) of the teacher's
    T5 + CE and of the student's DT5 + CA (Neodragon form)."""
    from neodragon_jax.plan import abstract_model, count_params, lowered_flops, sds

    text = cfg.model.text
    neo_text = neo_text or text
    kw = TextDistill._kw(cfg)
    ids = sds((1, text.max_length), jnp.int32)
    feats = lambda w: sds((1, text.max_length, w), kw["dtype"])  # noqa: E731
    parts = {
        "T5": (lambda r: T5Encoder(text.t5, rngs=r, **kw), lambda m, i, k: m(i, k), (ids, ids)),
        "CE": (lambda r: ContextEmbedder(text.t5.d_model, cfg.model.mmdit.hidden_size, rngs=r, **kw),
               lambda m, x: m(x), (feats(text.t5.d_model),)),
        "DT5": (lambda r: DistilT5(neo_text.distil_t5, rngs=r, **kw), lambda m, i, k: m(i, k), (ids, ids)),
        "CA": (lambda r: ContextAdapter(neo_text.context_adapter, rngs=r, **kw), lambda m, x: m(x),
               (feats(neo_text.context_adapter.in_dim),)),
    }
    out = {}
    for name, (build, call, inputs) in parts.items():
        m = abstract_model(build)
        out[name] = {"params": count_params(m), "flops": lowered_flops(m, call, *inputs)}
    for name, (a, b) in {"teacher (T5 + CE)": ("T5", "CE"), "student (DT5 + CA)": ("DT5", "CA")}.items():
        out[name] = {"params": out[a]["params"] + out[b]["params"], "flops": out[a]["flops"] + out[b]["flops"]}
    return out


__all__ = ["MODES", "NAME", "CacheError", "DistilledRun", "TargetCache", "TextDistill", "TextDistillSettings",
           "build_target_cache", "cache_key", "distill_loss", "load_run", "neodragon_form", "t5_tokenize",
           "teacher_function", "text_costs", "token_metrics"]
