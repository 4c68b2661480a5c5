"""Prompt corpora for text-only training (text-encoder distillation, spec §4.4: prompts, no images or videos).

A corpus is a folder::

    train.jsonl     {"text": prompt} per line: the training prompts
    heldout.jsonl   {"text": prompt} per line: prompts kept out of training, for evaluation
    corpus.json     the record: counts, sources (path, sha256, prompts read), duplicates removed, how the
                    held-out prompts were chosen, sha256 of each split

:func:`build_corpus` makes one from text files (one prompt per line) and JSONL files (a ``text`` field, or
``prompt`` / ``caption``): whitespace is collapsed, empty lines dropped, exact duplicates removed (first
occurrence kept, across all files), and the held-out prompts are either given as files of their own (every
copy of them is then removed from training) or drawn by a seeded hash of the prompt (a prompt's split does
not depend on which files hold it or in what order). :func:`write_tiny_corpus` writes the synthetic domain's
corpus: many more captions than the demo has videos, training prompts only from the training (colour, shape,
motion) triples of ``split_combinations`` and held-out prompts only from its held-out triples, so held-out
prompts ask for combinations no training prompt (and no teacher training video) contains.
:func:`load_corpus` reads a corpus folder, a single prompt file (no held-out split) or a ``captions.jsonl``
dataset folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from neodragon_jax.data.video_folder import DatasetError
from neodragon_jax.releases import file_digest

TRAIN_FILE, HELDOUT_FILE, RECORD = "train.jsonl", "heldout.jsonl", "corpus.json"
TEXT_FIELDS = ("text", "prompt", "caption")


class CorpusError(DatasetError):
    """A prompt file or corpus folder that cannot be read; the message names the file (and line). A user
    error (a ``DatasetError``): the CLI prints it as one line."""


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped (the form prompts are deduplicated in)."""
    return " ".join(str(text).split())


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a ``.jsonl`` (one JSON object per line with a ``text``, ``prompt`` or ``caption`` field) or
    of any other text file (one prompt per line), normalised, empty ones dropped, in file order."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"prompt file {str(path)!r} does not exist (expected a .txt of one prompt per line or a "
                          f".jsonl with a 'text' field)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                field = next(f for f in TEXT_FIELDS if isinstance(obj, dict) and f in obj)
                text = obj[field]
                if not isinstance(text, str):
                    raise TypeError(f"{field} is {type(text).__name__}")
            except (ValueError, StopIteration, TypeError) as e:
                why = "no text/prompt/caption field" if isinstance(e, StopIteration) else e
                raise CorpusError(f"{path}:{i}: not a JSON object with a string 'text' field ({why})") from None
            out.append(normalise(text))
    else:
        out = [normalise(t) for t in lines]
    return [t for t in out if t]


def _sha256_lines(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def _hash_fraction(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the prompt and the seed."""
    d = hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    os.replace(tmp, path)


def _write_record(folder: Path, record: dict) -> None:
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / RECORD)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and held-out prompts (normalised, unique) and the record they came with."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    record: dict
    source: str

    @property
    def digest(self) -> str:
        """sha256 of the training prompts in order (what a target cache is keyed on)."""
        return self.record.get("sha256", {}).get("train") or _sha256_lines(self.train)


def write_corpus(out_dir: str | os.PathLike, train: Sequence[str], heldout: Sequence[str], record: dict) -> Corpus:
    """Write the corpus folder (``train.jsonl``, ``heldout.jsonl``, ``corpus.json``); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = tuple(train), tuple(heldout)
    overlap = set(train) & set(heldout)
    if overlap:
        raise CorpusError(f"{len(overlap)} prompts are both training and held-out prompts, e.g. {sorted(overlap)[0]!r}")
    record = dict(record, format=1, num_train=len(train), num_heldout=len(heldout),
                  sha256={"train": _sha256_lines(train), "heldout": _sha256_lines(heldout)})
    _write_jsonl(out / TRAIN_FILE, train)
    _write_jsonl(out / HELDOUT_FILE, heldout)
    _write_record(out, record)
    return Corpus(train, heldout, record, str(out))


def build_corpus(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 heldout: Sequence[str | os.PathLike] = (), heldout_fraction: float = 0.01, seed: int = 0) -> Corpus:
    """A corpus folder from prompt files: normalised, deduplicated, split (see the module docstring).

    ``heldout``: files of held-out prompts (then ``heldout_fraction`` is not used); otherwise a prompt is
    held out when its seeded hash falls below ``heldout_fraction``.
    """
    if not sources:
        raise CorpusError("no prompt files given")
    if not 0.0 <= heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    seen: set[str] = set()
    read = duplicates = 0
    train: list[str] = []
    listed = []
    for src in sources:
        texts = read_prompt_file(src)
        listed.append({"path": str(src), "sha256": file_digest(Path(src)), "prompts": len(texts)})
        read += len(texts)
        for t in texts:
            if t in seen:
                duplicates += 1
                continue
            seen.add(t)
            train.append(t)
    held: list[str] = []
    if heldout:
        hs: set[str] = set()
        for src in heldout:
            texts = read_prompt_file(src)
            listed.append({"path": str(src), "sha256": file_digest(Path(src)), "prompts": len(texts), "heldout": True})
            for t in texts:
                if t not in hs:
                    hs.add(t)
                    held.append(t)
        removed = sum(1 for t in train if t in hs)
        train = [t for t in train if t not in hs]
        rule = {"files": [str(h) for h in heldout], "removed_from_train": removed}
    else:
        held = [t for t in train if _hash_fraction(t, seed) < heldout_fraction]
        hs = set(held)
        train = [t for t in train if t not in hs]
        rule = {"hash_fraction": heldout_fraction, "seed": seed}
    if not train:
        raise CorpusError("the corpus has no training prompts left")
    return write_corpus(out_dir, train, held, {"kind": "files", "sources": listed, "prompts_read": read,
                                               "duplicates_removed": duplicates, "heldout_rule": rule})


def write_tiny_corpus(out_dir: str | os.PathLike, *, num_train: int = 20000, num_heldout: int = 128, seed: int = 0,
                      held_out_fraction: float = 0.1, split_seed: int = 0, two_object_prob: float = 0.0) -> Corpus:
    """The synthetic domain's corpus: ``num_train`` unique captions of scenes drawn from the training triples
    and ``num_heldout`` unique captions of one-object scenes with held-out triples
    (``split_combinations(held_out_fraction, split_seed)``, the demo's split by default). Captions are drawn
    with :func:`~neodragon_jax.data.captions.caption` (random wordings), so one scene yields many prompts.
    Also writes ``heldout_scenes.jsonl`` (each held-out prompt's attributes)."""
    import numpy as np

    from neodragon_jax.data.captions import caption, sample_scene, split_combinations

    if num_train < 1 or num_heldout < 0:
        raise CorpusError(f"num_train must be >= 1 and num_heldout >= 0, got {num_train} and {num_heldout}")
    split = split_combinations(held_out_fraction, split_seed)
    rng = np.random.default_rng([seed, 0])
    train: dict[str, None] = {}
    tries = 0
    while len(train) < num_train:
        tries += 1
        if tries > 50 * num_train + 1000:
            raise CorpusError(f"only {len(train)} distinct training captions after {tries} draws: the domain has "
                              f"fewer than num_train={num_train}")
        train.setdefault(caption(sample_scene(rng, combinations=split.train, two_object_prob=two_object_prob), rng))
    tries_train = tries
    hrng = np.random.default_rng([seed, 1])
    held: dict[str, dict] = {}
    tries = 0
    while len(held) < num_heldout:
        tries += 1
        if tries > 50 * num_heldout + 1000:
            raise CorpusError(f"only {len(held)} distinct held-out captions after {tries} draws")
        scene = sample_scene(hrng, combinations=split.held_out, num_objects=1)
        text = caption(scene, hrng)
        if text not in held:
            held[text] = {"text": text, "background": scene.background,
                          "objects": [dataclasses.asdict(o) for o in scene.objects]}
    corpus = write_corpus(out_dir, list(train), list(held), {
        "kind": "tiny", "seed": seed, "held_out_fraction": held_out_fraction, "split_seed": split_seed,
        "two_object_prob": two_object_prob, "train_triples": len(split.train), "heldout_triples": len(split.held_out),
        "draws": {"train": tries_train, "heldout": tries}})
    _write_jsonl_objects(Path(out_dir) / "heldout_scenes.jsonl", list(held.values()))
    return corpus


def _write_jsonl_objects(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def load_corpus(path: str | os.PathLike) -> Corpus:
    """A corpus folder (``train.jsonl`` + ``heldout.jsonl``), a dataset folder with a ``captions.jsonl`` or a
    single prompt file (both: training prompts only, deduplicated, no held-out prompts)."""
    p = Path(path)
    if p.is_dir() and (p / TRAIN_FILE).is_file():
        record = {}
        if (p / RECORD).is_file():
            try:
                record = json.loads((p / RECORD).read_text())
            except ValueError as e:
                raise CorpusError(f"{p / RECORD}: not valid JSON ({e})") from None
        train = read_prompt_file(p / TRAIN_FILE)
        held = read_prompt_file(p / HELDOUT_FILE) if (p / HELDOUT_FILE).is_file() else []
        if not train:
            raise CorpusError(f"{p / TRAIN_FILE} holds no prompts")
        return Corpus(tuple(train), tuple(held), record, str(p))
    if p.is_dir() and (p / "captions.jsonl").is_file():
        p = p / "captions.jsonl"
    if p.is_file():
        train = tuple(dict.fromkeys(read_prompt_file(p)))
        if not train:
            raise CorpusError(f"{p} holds no prompts")
        return Corpus(train, (), {"kind": "file", "path": str(p)}, str(p))
    raise CorpusError(f"prompt corpus {str(p)!r} not found: expected a corpus folder ({TRAIN_FILE}, {HELDOUT_FILE}; "
                      f"`neodragon text-distill corpus` writes one), a folder with a captions.jsonl, or a prompt file")


__all__ = ["Corpus", "CorpusError", "build_corpus", "load_corpus", "normalise", "read_prompt_file",
           "write_corpus", "write_tiny_corpus"]
