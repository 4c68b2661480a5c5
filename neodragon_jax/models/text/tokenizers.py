"""The three prompt tokenizers of the SD3 / Pyramid Flow / Neodragon text stack (spec §1.3 step 3, §4).

Folder layout (the official release's, and the shipped tiny preset's)::

    root/tokenizer/     CLIP-L      (CLIPTokenizer; pads with <|endoftext|>)
    root/tokenizer_2/   CLIP-bigG   (CLIPTokenizer; pads with "!", id 0)
    root/tokenizer_3/   T5          (T5Tokenizer, SentencePiece; pad 0, EOS 1)

Tokenisation is exactly the official pipeline's (Pyramid Flow ``SD3TextEncoderWithMask``): T5 with
``padding="max_length", max_length=cfg.max_length, truncation=True, add_special_tokens=True`` plus its
attention mask; both CLIPs with ``padding="max_length", max_length=cfg.clip_max_length, truncation=True``.
Truncation keeps the closing EOS (transformers truncates the text, then adds the special tokens). The prompt
modifier is NOT applied here (the pipeline appends ``cfg.prompt_modifier``); an empty prompt is valid (the
unconditional branch of classifier-free guidance).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neodragon_jax.config.schema import CLIPTextConfig, TextConfig

SUBFOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
_LAYOUT = "tokenizer/ (CLIP-L), tokenizer_2/ (CLIP-bigG) and tokenizer_3/ (T5)"
# Configs written before transformers PR #24773 (the official SD3 text encoders, the tiny preset) carry
# eos_token_id=2, which means "pool at argmax(input_ids)": right only if EOS is the tokenizer's largest id.
_LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids of a batch of prompts, all int32.

    t5_ids, t5_mask: [B, S] with S = cfg.max_length (mask 1 on real tokens including EOS, 0 on padding).
    clip_l_ids, clip_g_ids: [B, S_clip] with S_clip = cfg.clip_max_length.
    """

    t5_ids: np.ndarray
    t5_mask: np.ndarray
    clip_l_ids: np.ndarray
    clip_g_ids: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.t5_ids.shape[0]


def shipped_tokenizer_dir(preset: str) -> Path:
    """Folder of the tokenizers shipped for ``preset`` (``neodragon_jax/_assets/tokenizers/<preset>``)."""
    root = Path(str(importlib.resources.files("neodragon_jax").joinpath("_assets", "tokenizers")))
    folder = root / preset
    if not folder.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(
            f"no shipped tokenizers for preset {preset!r} (looked in {folder}); shipped presets: {available}. "
            "Set model.text.tokenizer_preset to one of them, or model.text.tokenizer_dir to a folder holding "
            f"{_LAYOUT}."
        )
    return folder


class TextTokenizers:
    """CLIP-L, CLIP-bigG and T5 tokenizers with the official padding/truncation, checked against ``cfg``."""

    def __init__(self, clip_l, clip_g, t5, cfg: TextConfig, *, source: str = "<in memory>"):
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5
        self.cfg = cfg
        self.source = source
        self._check()

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, root: str | Path, cfg: TextConfig) -> "TextTokenizers":
        """Load ``root/tokenizer``, ``root/tokenizer_2`` and ``root/tokenizer_3`` (the official layout)."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        root = Path(root).expanduser()
        missing = [name for name in SUBFOLDERS.values() if not (root / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer folder {root} is incomplete: missing {', '.join(m + '/' for m in missing)}. "
                f"Expected {_LAYOUT} under it, as in the official SD3 / Pyramid Flow release; point "
                "model.text.tokenizer_dir at that folder."
            )
        loaded = {}
        for key, name in SUBFOLDERS.items():
            loader = T5TokenizerFast if key == "t5" else CLIPTokenizer
            try:
                loaded[key] = loader.from_pretrained(str(root / name), local_files_only=True)
            except (OSError, ValueError, TypeError) as err:
                raise ValueError(
                    f"could not load the {loader.__name__} in {root / name}: {err}. The folder should hold "
                    "tokenizer_config.json plus tokenizer.json, vocab.json + merges.txt (CLIP) or "
                    "spiece.model (T5)."
                ) from err
        return cls(loaded["clip_l"], loaded["clip_g"], loaded["t5"], cfg, source=str(root))

    @classmethod
    def for_config(cls, cfg: TextConfig) -> "TextTokenizers":
        """``cfg.tokenizer_dir`` if set, else the shipped folder of ``cfg.tokenizer_preset``."""
        if cfg.tokenizer_dir:
            return cls.from_folder(cfg.tokenizer_dir, cfg)
        if cfg.tokenizer_preset:
            return cls.from_folder(shipped_tokenizer_dir(cfg.tokenizer_preset), cfg)
        raise ValueError(
            "no tokenizers configured: set model.text.tokenizer_dir to a folder holding "
            f"{_LAYOUT} (e.g. the official release), or model.text.tokenizer_preset='tiny' for the shipped ones"
        )

    # ---------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        cfg = self.cfg
        t5_vocab = cfg.t5.vocab_size if cfg.kind == "teacher" else cfg.distil_t5.body.vocab_size
        problems = []
        if len(self.t5) > t5_vocab:
            problems.append(f"T5 tokenizer has {len(self.t5)} tokens but the T5 embedding has {t5_vocab} rows")
        for key, tok, ccfg in (("clip_l", self.clip_l, cfg.clip_l), ("clip_g", self.clip_g, cfg.clip_g)):
            problems.extend(_clip_problems(key, tok, ccfg))
            if cfg.clip_max_length > ccfg.max_position_embeddings:
                problems.append(
                    f"clip_max_length {cfg.clip_max_length} exceeds {key}.max_position_embeddings "
                    f"{ccfg.max_position_embeddings}"
                )
        if problems:
            raise ValueError(
                f"tokenizers in {self.source} do not fit the text config: " + "; ".join(problems)
                + ". Use the tokenizers that belong to these weights, or fix model.text in the config."
            )

    def __call__(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Tokenise a batch of prompts (already carrying any prompt modifier)."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it in a list")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt ('' for the unconditional branch)")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a str, got {bad}")

        cfg = self.cfg
        t5 = self.t5(
            prompts,
            padding="max_length",
            max_length=cfg.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        clip = {}
        for key, tok in (("clip_l", self.clip_l), ("clip_g", self.clip_g)):
            clip[key] = tok(
                prompts, padding="max_length", max_length=cfg.clip_max_length, truncation=True, return_tensors="np"
            ).input_ids
        return TokenizedPrompts(
            t5_ids=np.asarray(t5.input_ids, dtype=np.int32),
            t5_mask=np.asarray(t5.attention_mask, dtype=np.int32),
            clip_l_ids=np.asarray(clip["clip_l"], dtype=np.int32),
            clip_g_ids=np.asarray(clip["clip_g"], dtype=np.int32),
        )

    def __repr__(self) -> str:
        return (
            f"TextTokenizers(source={self.source!r}, t5={len(self.t5)} tokens, clip_l={len(self.clip_l)}, "
            f"clip_g={len(self.clip_g)}, max_length={self.cfg.max_length}, "
            f"clip_max_length={self.cfg.clip_max_length})"
        )


def _clip_problems(key: str, tok, ccfg: CLIPTextConfig) -> list[str]:
    problems = []
    if len(tok) > ccfg.vocab_size:
        problems.append(f"{key} tokenizer has {len(tok)} tokens but {key}.vocab_size is {ccfg.vocab_size}")
    if ccfg.eos_token_id == _LEGACY_EOS_TOKEN_ID:
        # Legacy config: the encoder pools at argmax(input_ids), and its pad_token_id is not the tokenizer's
        # (the official CLIP-L config says 1 while the tokenizer pads with 49407), so only EOS is checked.
        largest = max(tok.get_vocab().values())
        if tok.eos_token_id != largest:
            problems.append(
                f"{key}.eos_token_id=2 pools at argmax(input_ids), which needs EOS to be the largest id, but the "
                f"tokenizer's EOS is {tok.eos_token_id} and its largest id is {largest}"
            )
        return problems
    if tok.eos_token_id != ccfg.eos_token_id:
        problems.append(f"{key}.eos_token_id is {ccfg.eos_token_id} but the tokenizer's EOS is {tok.eos_token_id}")
    if tok.pad_token_id != ccfg.pad_token_id:
        problems.append(f"{key}.pad_token_id is {ccfg.pad_token_id} but the tokenizer pads with {tok.pad_token_id}")
    return problems


__all__ = ["SUBFOLDERS", "TextTokenizers", "TokenizedPrompts", "shipped_tokenizer_dir"]
