"""Prompt tokenizers: official padding/truncation, EOS placement, the shipped tiny folders and their rebuild."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.data import captions as C
from neodragon_jax.models.text import build_tiny_tokenizers as build
from neodragon_jax.models.text.tokenizers import TextTokenizers, shipped_tokenizer_dir

LONG_PROMPT = "a small red circle moving slowly to the left " * 20


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny").model.text


@pytest.fixture(scope="module")
def toks(cfg):
    return TextTokenizers.for_config(cfg)


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    model = shipped_tokenizer_dir("tiny") / "tokenizer_3" / "spiece.model"
    return sentencepiece.SentencePieceProcessor(model_file=str(model))


@pytest.fixture(scope="module")
def prompts():
    return list(C.caption_corpus(300, seed=123)) + ["", LONG_PROMPT, "A Red circle, moving LEFT!!"]


def test_shapes_and_dtypes(toks, cfg, prompts):
    out = toks(prompts)
    b = len(prompts)
    assert out.t5_ids.shape == out.t5_mask.shape == (b, cfg.max_length)
    assert out.clip_l_ids.shape == out.clip_g_ids.shape == (b, cfg.clip_max_length)
    for a in (out.t5_ids, out.t5_mask, out.clip_l_ids, out.clip_g_ids):
        assert a.dtype == np.int32
    assert out.t5_ids.max() < cfg.t5.vocab_size
    assert out.clip_l_ids.max() < cfg.clip_l.vocab_size and out.clip_g_ids.max() < cfg.clip_g.vocab_size


def test_t5_matches_sentencepiece_with_eos_and_truncation(toks, cfg, sp, prompts):
    """Reference: the SentencePiece model itself, then T5's rule: truncate to S-1 pieces, append EOS (1),
    pad with 0; mask covers the pieces and the EOS."""
    out = toks(prompts)
    s = cfg.max_length
    for row, text in enumerate(prompts):
        pieces = sp.encode(text)[: s - 1] + [1]
        expected = np.zeros(s, np.int32)
        expected[: len(pieces)] = pieces
        np.testing.assert_array_equal(out.t5_ids[row], expected, err_msg=text)
        np.testing.assert_array_equal(out.t5_mask[row], (np.arange(s) < len(pieces)).astype(np.int32))


def test_clip_layout_bos_words_eos_pad(toks, cfg, prompts):
    """BOS, the words (at most S-2), EOS; then CLIP-L repeats EOS and bigG pads with '!' (id 0).

    As in the official bigG tokenizer, '!' is bigG's pad token, so a typed '!' also becomes id 0 there."""
    out = toks(prompts)
    s = cfg.clip_max_length
    bos, eos = toks.clip_l.bos_token_id, toks.clip_l.eos_token_id
    for row, text in enumerate(prompts):
        for tok, ids, pad in ((toks.clip_l, out.clip_l_ids, eos), (toks.clip_g, out.clip_g_ids, 0)):
            words = tok(text, add_special_tokens=False).input_ids[: s - 2]
            expected = [bos, *words, eos] + [pad] * (s - len(words) - 2)
            np.testing.assert_array_equal(ids[row], expected, err_msg=text)
    bang = toks(["red!"])
    assert bang.clip_l_ids[0, 2] != 0 and bang.clip_g_ids[0, 2] == 0


def test_empty_prompt_is_the_unconditional_row(toks, cfg):
    out = toks([""])
    assert out.t5_ids[0].tolist() == [1] + [0] * (cfg.max_length - 1)
    assert out.t5_mask[0].tolist() == [1] + [0] * (cfg.max_length - 1)
    assert out.clip_l_ids[0].tolist() == [510] + [511] * (cfg.clip_max_length - 1)
    assert out.clip_g_ids[0].tolist() == [510, 511] + [0] * (cfg.clip_max_length - 2)


def test_long_prompt_is_truncated_with_eos_last(toks, cfg):
    out = toks([LONG_PROMPT])
    assert out.t5_ids[0, -1] == 1 and out.t5_mask[0].all()
    assert (out.t5_ids[0, :-1] != 1).all()
    for ids in (out.clip_l_ids[0], out.clip_g_ids[0]):
        assert ids[0] == 510 and ids[-1] == 511 and (ids[1:-1] < 510).all()


def test_eos_pooling_rule_of_the_preset_lands_on_eos(toks, cfg, prompts):
    """The tiny preset's CLIP configs say eos_token_id=2 (legacy: pool at argmax(input_ids), as the official
    SD3 encoders); with EOS the largest id that is the first EOS of every row, for both CLIPs."""
    assert cfg.clip_l.eos_token_id == cfg.clip_g.eos_token_id == 2
    assert toks.clip_l.eos_token_id == toks.clip_g.eos_token_id == cfg.clip_l.vocab_size - 1
    out = toks(prompts)
    for ids in (out.clip_l_ids, out.clip_g_ids):
        first_eos = np.argmax(ids == toks.clip_l.eos_token_id, axis=-1)
        np.testing.assert_array_equal(np.argmax(ids, axis=-1), first_eos)
    assert toks.t5.eos_token_id == 1 and toks.t5.pad_token_id == 0


def test_captions_round_trip_without_unk_or_truncation(toks, cfg):
    texts = list(C.caption_corpus(500, seed=9))
    out = toks(texts)
    assert not (out.t5_ids == toks.t5.unk_token_id).any()
    # Every caption fits: EOS is a real token before the window ends (T5) and CLIP's words are not cut.
    assert (out.t5_mask.sum(-1) < cfg.max_length).all()
    for row, text in enumerate(texts):
        assert toks.t5.decode(out.t5_ids[row], skip_special_tokens=True) == text
        # CLIP lower-cases and splits punctuation off into its own word.
        clip_text = re.sub(r"\s*([,:])", r" \1", text.lower())
        for tok, ids in ((toks.clip_l, out.clip_l_ids[row]), (toks.clip_g, out.clip_g_ids[row])):
            words = ids[(ids != 510) & (ids != 511) & (ids != 0)]
            assert len(words) == len(tok(text, add_special_tokens=False).input_ids)  # nothing cut, no <unk>
            assert tok.decode(ids, skip_special_tokens=True) == clip_text


def test_every_caption_word_is_one_token(toks):
    for word in C.all_caption_words():
        assert len(toks.clip_l(word, add_special_tokens=False).input_ids) == 1, word
        assert len(toks.t5(word, add_special_tokens=False).input_ids) == 1, word


def test_rebuild_is_deterministic(tmp_path):
    """The shipped folders were built from the earlier, larger caption vocabulary (8 shapes, sizes, speeds,
    bounce, patterned backgrounds) and are kept: today's captions use a subset of their words, each still one
    token (``test_every_caption_word_is_one_token``), and keeping them keeps the token ids of trained
    checkpoints. A rebuild from today's captions therefore differs from the shipped bytes; it must still be
    deterministic."""
    build.build(tmp_path / "a")
    build.build(tmp_path / "b")
    assert build.diff_trees(tmp_path / "a", tmp_path / "b") == []
    size = sum(p.stat().st_size for p in shipped_tokenizer_dir("tiny").rglob("*") if p.is_file())
    assert size < 300_000


def test_official_slow_layout_loads_the_same(tmp_path, cfg, toks, prompts):
    """The released SD3 folders have vocab.json + merges.txt (CLIP) and spiece.model (T5) with
    tokenizer_config.json / special_tokens_map.json; loading that layout must give the same ids."""
    shipped = shipped_tokenizer_dir("tiny")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (tmp_path / name).mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(shipped / name / f, tmp_path / name / f)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad,
                   "unk_token": "<|endoftext|>"}
        (tmp_path / name / "special_tokens_map.json").write_text(json.dumps(special))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(
            {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
             "errors": "replace", "add_prefix_space": False}))
    (tmp_path / "tokenizer_3").mkdir()
    shutil.copy(shipped / "tokenizer_3" / "spiece.model", tmp_path / "tokenizer_3" / "spiece.model")
    (tmp_path / "tokenizer_3" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
         "extra_ids": 0, "model_max_length": 512}))
    official = TextTokenizers.from_folder(tmp_path, cfg)
    a, b = official(prompts), toks(prompts)
    for field in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name), err_msg=field.name)


def test_missing_folder_names_path_and_layout(tmp_path, cfg):
    with pytest.raises(FileNotFoundError) as err:
        TextTokenizers.from_folder(tmp_path / "nowhere", cfg)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    for name in ("tokenizer/", "tokenizer_2/", "tokenizer_3/"):
        assert name in message
    shutil.copytree(shipped_tokenizer_dir("tiny") / "tokenizer", tmp_path / "partial" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer_2/, tokenizer_3/"):
        TextTokenizers.from_folder(tmp_path / "partial", cfg)


def test_config_resolution_errors(cfg):
    with pytest.raises(ValueError, match="tokenizer_dir"):
        TextTokenizers.for_config(dataclasses.replace(cfg, tokenizer_preset="", tokenizer_dir=""))
    with pytest.raises(FileNotFoundError, match="shipped presets"):
        TextTokenizers.for_config(dataclasses.replace(cfg, tokenizer_preset="no-such-preset"))


def test_tokenizers_that_do_not_fit_the_config_are_rejected(cfg):
    small_vocab = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, vocab_size=64))
    with pytest.raises(ValueError, match="T5 tokenizer has"):
        TextTokenizers.for_config(small_vocab)
    modern_eos = dataclasses.replace(cfg, clip_g=dataclasses.replace(cfg.clip_g, eos_token_id=7))
    with pytest.raises(ValueError, match="clip_g.eos_token_id is 7"):
        TextTokenizers.for_config(modern_eos)
    matching = dataclasses.replace(
        cfg,
        clip_l=dataclasses.replace(cfg.clip_l, eos_token_id=511, pad_token_id=511),
        clip_g=dataclasses.replace(cfg.clip_g, eos_token_id=511, pad_token_id=0),
    )
    TextTokenizers.for_config(matching)  # the non-legacy spelling of the same ids is accepted


def test_bad_prompt_arguments(toks):
    with pytest.raises(TypeError, match="wrap it in a list"):
        toks("a red circle")
    with pytest.raises(ValueError, match="empty"):
        toks([])
    with pytest.raises(TypeError):
        toks(["ok", None])
