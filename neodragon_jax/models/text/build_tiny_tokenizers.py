"""Train the tiny preset's three tokenizers from the synthetic caption corpus, offline and deterministically.

    python -m neodragon_jax.models.text.build_tiny_tokenizers            # rewrite the shipped folders
    python -m neodragon_jax.models.text.build_tiny_tokenizers --out DIR  # build elsewhere
    python -m neodragon_jax.models.text.build_tiny_tokenizers --check    # exit 1 if a rebuild would differ

The layout mirrors the official SD3 / Pyramid Flow release, scaled down:

* ``tokenizer/`` (CLIP-L) and ``tokenizer_2/`` (CLIP-bigG): the same byte-level BPE with CLIP's ``</w>``
  end-of-word suffix, lower-casing and pre-tokenizer (transformers' ``CLIPTokenizer``). Ids are laid out as in
  CLIP: raw byte symbols first (``!`` is id 0), then end-of-word symbols, then merges, then
  ``<|startoftext|>`` and ``<|endoftext|>`` as the two LARGEST ids (510, 511). EOS being the largest id is what
  makes "pool at argmax(input_ids)" (the rule transformers applies to configs with ``eos_token_id == 2``, as
  the official SD3 text encoders and the tiny preset have) land on the EOS token. CLIP-L pads with
  ``<|endoftext|>``, bigG pads with ``!`` (id 0), like the official ``tokenizer_2``.
* ``tokenizer_3/`` (T5): a SentencePiece unigram model (``spiece.model``) with T5's special ids (pad 0,
  EOS 1, unk 2, no BOS), saved as a ``T5Tokenizer`` folder. ``extra_ids=0``: sentinel tokens are never used
  for conditioning, and without them every id stays below the preset's 512-row embedding.

Determinism: the corpus is generated from fixed seeds, the SentencePiece trainer runs single-threaded on
an in-memory iterator (so no file path is recorded in the model), and the BPE merges are re-numbered here in
a fixed order. Normalisation is SentencePiece's ``identity`` rule: T5's ``nmt_nfkc`` table alone would add
~0.5 MB to the shipped files and the synthetic prompts are plain ASCII.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import shutil
import string
import sys
import tempfile
from collections import Counter
from pathlib import Path

from neodragon_jax.data import captions

#: Vocabulary sizes of the tiny preset (configs/tiny.toml: t5.vocab_size, clip_l/clip_g.vocab_size).
T5_VOCAB_SIZE = 512
CLIP_VOCAB_SIZE = 512
CORPUS_SIZE = 5000
CORPUS_SEED = 0
#: Official pipeline strings (spec §1.3): default and cinematic prompt modifiers, default negative prompt.
PIPELINE_STRINGS = (
    ", hyper quality, Ultra HD, 8K",
    ", cinematic, realistic textures, high detail, natural colours",
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, extra limbs, "
    "extra digits, misplaced objects, mutated anatomy, monochrome, horror",
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_G_PAD = "!"
CLIP_EOW = "</w>"
# The CLIP text pipeline lower-cases before splitting, so upper-case letters never reach the BPE model.
_ASCII_SYMBOLS = [c for c in string.printable if not c.isspace() and not c.isupper()]


def default_output_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "_assets" / "tokenizers" / "tiny"


def training_corpus() -> list[str]:
    """Captions, every phrase at least once, sentence-case variants (what users type) and pipeline strings."""
    corpus = list(captions.caption_corpus(CORPUS_SIZE, seed=CORPUS_SEED))
    sentence_case = [c[0].upper() + c[1:] + "." for c in corpus[: CORPUS_SIZE // 10]]
    return corpus + sentence_case + captions.phrase_inventory() + list(PIPELINE_STRINGS)


# ---------------------------------------------------------------------------------------------------------
# T5 (SentencePiece)
# ---------------------------------------------------------------------------------------------------------


def train_sentencepiece(corpus: list[str]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_VOCAB_SIZE,
        # The caption corpus supports fewer pieces than 512; take what it supports rather than fail.
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="identity",
        character_coverage=1.0,
        # Every printable ASCII character gets a piece, so typed prompts never produce <unk>.
        required_chars="".join(c for c in string.printable if not c.isspace()),
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def build_t5(corpus: list[str], out: Path) -> None:
    from transformers import T5TokenizerFast

    proto = train_sentencepiece(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(proto)
        tok = T5TokenizerFast.from_pretrained(
            tmp, extra_ids=0, model_max_length=512, clean_up_tokenization_spaces=False
        )
    # Loading-time bookkeeping, not tokenizer settings; left in, it would make the saved config path-dependent.
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok.init_kwargs.pop(key, None)
    tok.save_pretrained(out)
    (out / "spiece.model").write_bytes(proto)


# ---------------------------------------------------------------------------------------------------------
# CLIP (byte-level BPE)
# ---------------------------------------------------------------------------------------------------------


def _clip_backend():
    """A ``tokenizers.Tokenizer`` with transformers' CLIPTokenizer normaliser and pre-tokenizer."""
    from transformers import CLIPTokenizer

    template = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[])
    return template.backend_tokenizer


def clip_words(corpus: list[str]) -> Counter[str]:
    """Word counts after CLIP's own normaliser and pre-tokenizer (lower-case, regex split, byte-level)."""
    backend = _clip_backend()
    counts: Counter[str] = Counter()
    # Whitespace separates words and is dropped by the pre-tokenizer, so space-joined chunks split exactly
    # like the texts one by one (and far faster than one call per caption).
    for start in range(0, len(corpus), 1000):
        normalized = backend.normalizer.normalize_str(" ".join(corpus[start : start + 1000]))
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def train_clip_merges(corpus: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges in learned order, most frequent pair first, ties to the smallest pair.

    The ``tokenizers`` BpeTrainer breaks count ties by ids that depend on hash-map iteration order, which
    differs between processes; this loop (same algorithm, explicit tie rule) makes rebuilds byte-identical.
    The words it merges come from the ``tokenizers`` pipeline that ``CLIPTokenizer`` applies at encode time.
    """
    words = {tuple(w[:-1]) + (w[-1] + CLIP_EOW,): n for w, n in clip_words(corpus).items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge_word(symbols, best): n for symbols, n in words.items()}
    return merges


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: list[tuple[str, str]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's id layout at 512: raw symbols, end-of-word symbols, merge results, then BOS and EOS last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())  # CLIP's order: "!" first
    raw = [s for s in byte_symbols if s in _ASCII_SYMBOLS]
    eow = [s + CLIP_EOW for s in raw]
    budget = CLIP_VOCAB_SIZE - 2 - len(raw) - len(eow)
    kept, results = [], []
    seen = set(raw) | set(eow)
    for a, b in merges:
        if a not in seen or b not in seen:
            continue  # built from a symbol outside the kept alphabet
        merged = a + b
        new = merged not in seen
        if new and len(results) == budget:
            break
        kept.append((a, b))
        if new:
            results.append(merged)
            seen.add(merged)
    # Leftover slots (if the corpus needs fewer merges) get further raw byte symbols, in CLIP's byte order,
    # so the vocabulary is always exactly CLIP_VOCAB_SIZE and BOS/EOS keep ids 510/511.
    spare = [s for s in byte_symbols if s not in set(raw) and not "A" <= s <= "Z"]
    raw = raw + spare[: budget - len(results)]
    tokens = raw + eow + results + [CLIP_BOS, CLIP_EOS]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != len(tokens):
        raise RuntimeError(f"CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE} distinct")
    return {t: i for i, t in enumerate(tokens)}, kept


def build_clip(corpus: list[str], out_l: Path, out_g: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(train_clip_merges(corpus, max_merges=CLIP_VOCAB_SIZE))
    for out, pad in ((out_l, CLIP_EOS), (out_g, CLIP_G_PAD)):
        tok = CLIPTokenizer(
            vocab=vocab,
            merges=merges,
            pad_token=pad,
            model_max_length=77,
            # transformers 5 ignores clean-up for BPE tokenizers (with a warning) even where the official
            # config sets it, so decoded text keeps CLIP's spaces around punctuation either way.
            clean_up_tokenization_spaces=False,
        )
        tok.save_pretrained(out)
        # The official folders ship the slow-format files; keep them so both loading paths are exercised.
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------


def build(out_dir: Path) -> Path:
    """Write ``tokenizer/``, ``tokenizer_2/`` and ``tokenizer_3/`` under ``out_dir`` (replacing them)."""
    out_dir = Path(out_dir)
    corpus = training_corpus()
    names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    for name in names:
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
        (out_dir / name).mkdir(parents=True)
    build_clip(corpus, out_dir / "tokenizer", out_dir / "tokenizer_2")
    build_t5(corpus, out_dir / "tokenizer_3")
    return out_dir


def diff_trees(a: Path, b: Path) -> list[str]:
    """Relative paths that differ (missing on either side or different bytes)."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diffs = sorted(str(p) for p in files_a ^ files_b)
    diffs += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_output_dir(), help="output folder")
    parser.add_argument("--check", action="store_true", help="build into a temp folder and compare with --out")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            diffs = diff_trees(build(Path(tmp)), args.out)
        if diffs:
            print(f"rebuild differs from {args.out}: {diffs}", file=sys.stderr)
            return 1
        print(f"{args.out} matches a fresh build")
        return 0
    build(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
