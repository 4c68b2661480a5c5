"""Prompt corpora: text and JSONL files deduplicated (whitespace-insensitive) into a training and a held-out
split that does not depend on file order; held-out files remove their prompts from training; bad lines are
named; the tiny domain's corpus takes training prompts only from training triples and held-out prompts only
from held-out triples."""

import json

import pytest

from neodragon_jax.data.prompts import CorpusError, build_corpus, load_corpus, write_tiny_corpus


def test_files_are_deduplicated_and_split_by_prompt_hash(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("a red circle\n\n  a red   circle \na blue square\n" + "".join(f"prompt {i}\n" for i in range(200)))
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "a blue square"}) + "\n" + json.dumps({"prompt": "a green disc"}) + "\n")
    c1 = build_corpus([a, b], tmp_path / "c1", heldout_fraction=0.1, seed=3)
    assert c1.record["duplicates_removed"] == 2 and c1.record["prompts_read"] == 205
    assert len(c1.train) + len(c1.heldout) == 203 and not set(c1.train) & set(c1.heldout)
    assert 5 <= len(c1.heldout) <= 40
    c2 = build_corpus([b, a], tmp_path / "c2", heldout_fraction=0.1, seed=3)  # other order, same split
    assert set(c2.heldout) == set(c1.heldout) and set(c2.train) == set(c1.train)
    back = load_corpus(tmp_path / "c1")
    assert back.train == c1.train and back.heldout == c1.heldout and back.digest == c1.digest


def test_heldout_files_leave_training_and_bad_lines_are_named(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one\ntwo\nthree\n")
    h = tmp_path / "h.txt"
    h.write_text("two\nfour\n")
    c = build_corpus([a], tmp_path / "c", heldout=[h])
    assert c.train == ("one", "three") and c.heldout == ("two", "four")
    assert c.record["heldout_rule"]["removed_from_train"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"caption": 3}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not a JSON object with a string 'text' field"):
        build_corpus([bad], tmp_path / "d")
    with pytest.raises(CorpusError, match="does not exist"):
        build_corpus([tmp_path / "missing.txt"], tmp_path / "e")
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nowhere")


def test_tiny_corpus_splits_by_attribute_triples(tmp_path):
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.eval.scorer import parse_caption

    c = write_tiny_corpus(tmp_path, num_train=300, num_heldout=24, seed=1)
    assert len(set(c.train)) == 300 and len(set(c.heldout)) == 24 and not set(c.train) & set(c.heldout)
    split = split_combinations()

    def triples(text):
        p = parse_caption(text)
        return {(o.colour, o.shape, o.motion) for o in p.objects}

    assert all(triples(t) <= split.train for t in c.train)
    assert all(len(triples(t)) == 1 and triples(t) <= split.held_out for t in c.heldout)
    rows = [json.loads(x) for x in (tmp_path / "heldout_scenes.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == list(c.heldout)
    assert c.record["kind"] == "tiny" and c.record["num_train"] == 300
