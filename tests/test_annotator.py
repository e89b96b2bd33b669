"""Tests for rlhf_lib.data.annotator: prompt set, gold score, Bradley–Terry labels, sampling, the shipped responses."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest
import torch

from rlhf_lib.data import annotator
from rlhf_lib.data.annotator import Sample
from rlhf_lib.lm import models


# ---------------------------------------------------------------------------------------------------------------
# Prompt set
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_set_splits_are_disjoint_by_prompt_and_subject():
    prompts = annotator.load_prompt_set()
    counts = Counter(p["split"] for p in prompts)
    assert counts == {"rm": 1400, "ppo": 400, "eval": 200}
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["text"] for p in prompts}) == len(prompts)
    subjects = {split: {p["subject"] for p in prompts if p["split"] == split} for split in annotator.PROMPT_SPLITS}
    assert not subjects["rm"] & subjects["ppo"] and not subjects["rm"] & subjects["eval"]
    assert not subjects["ppo"] & subjects["eval"]
    assert all("two or three sentences" in p["text"] for p in prompts)  # short answers, so most finish


def test_select_prompts_takes_a_mixed_prefix_and_refuses_too_many():
    prompts = annotator.load_prompt_set()
    first = annotator.select_prompts(prompts, "rm", 100)
    assert [p["split"] for p in first] == ["rm"] * 100
    assert len({p["category"] for p in first}) >= 15  # the file order was shuffled once: any prefix is mixed
    with pytest.raises(ValueError, match="has 200"):
        annotator.select_prompts(prompts, "eval", 201)


def test_load_prompt_set_rejects_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "x", "split": "train", "subject": "s"}) + "\n")
    with pytest.raises(ValueError, match="line 1: split 'train'"):
        annotator.load_prompt_set(path)
    path.write_text(json.dumps({"id": "a", "text": "", "split": "rm", "subject": "s"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'text'"):
        annotator.load_prompt_set(path)


# ---------------------------------------------------------------------------------------------------------------
# Gold score and Bradley–Terry labels
# ---------------------------------------------------------------------------------------------------------------
def test_gold_scores_order_sentiment():
    good, neutral, bad = annotator.gold_scores(
        ["A wonderful, delightful cafe; I loved it.", "The cafe is on Main Street.", "Awful, rude staff. Terrible."]
    )
    assert good > 0.5 and bad < -0.5 and neutral == 0.0
    assert all(-1 <= g <= 1 for g in (good, neutral, bad))


def test_bt_probability_hand_values():
    p = annotator.bt_probability(np.array([0.5, 0.0, -0.25]), np.array([0.0, 0.0, 0.25]), beta=4.0)
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-2.0)), 0.5, 1 / (1 + np.exp(2.0))])


@pytest.mark.parametrize("beta", [0.0, 2.0, 6.0, 1000.0])
def test_bt_label_agreement_matches_bradley_terry(beta):
    rng = np.random.default_rng(1)
    n = 20_000
    a = rng.uniform(-1, 1, n)
    b = rng.uniform(-1, 1, n)
    b[np.abs(a - b) < 0.05] += 0.2  # no near-ties, so beta=1000 is deterministic
    first = annotator.bt_labels(a, b, beta, seed=0)
    gc, gr = np.where(first, a, b), np.where(first, b, a)
    agreement = annotator.label_gold_agreement(gc, gr)
    expected = float(np.mean(annotator.bt_probability(np.abs(a - b), 0 * a, beta)))
    assert agreement == pytest.approx(expected, abs=4 * np.sqrt(0.25 / n))
    if beta == 0.0:
        assert agreement == pytest.approx(0.5, abs=0.02)
    if beta == 1000.0:
        assert agreement == 1.0


def test_bt_labels_deterministic_under_seed():
    a, b = np.linspace(-1, 1, 200), np.linspace(1, -1, 200)
    np.testing.assert_array_equal(annotator.bt_labels(a, b, 2.0, 7), annotator.bt_labels(a, b, 2.0, 7))
    assert (annotator.bt_labels(a, b, 2.0, 7) != annotator.bt_labels(a, b, 2.0, 8)).any()


def test_label_gold_agreement_skips_ties():
    assert annotator.label_gold_agreement([0.5, 0.1, 0.3, 0.2], [0.1, 0.4, 0.3, 0.2]) == 0.5
    assert annotator.label_gold_agreement([0.3], [0.3]) is None


def test_length_baseline_accuracy_hand_values():
    # chosen longer, shorter, equal (1/2), and a tie in the reference that is skipped
    acc = annotator.length_baseline_accuracy([10, 3, 5, 9], [4, 8, 5, 1], [True, True, True, None])
    assert acc == pytest.approx((1 + 0 + 0.5) / 3)
    # reference prefers rejected: the longer rejected response makes "longer is better" right
    assert annotator.length_baseline_accuracy([3], [8], [False]) == 1.0
    assert annotator.length_baseline_accuracy([3, 9], [8, 1]) == 0.5  # default reference: the labels


def test_pair_statistics_on_hand_made_pairs():
    s = lambda text, n, fin: Sample(ids=list(range(n)), text=text, finished=fin)  # noqa: E731
    pairs = [
        (s("I love it, wonderful", 5, True), s("It is bad", 3, True)),
        (s("ok", 2, False), s("ok", 2, True)),  # a gold tie
    ]
    stats = annotator.pair_statistics(pairs, beta=1000.0, seed=0)
    assert stats["n_pairs"] == 2 and stats["gold_tie_rate"] == 0.5
    assert stats["label_gold_agreement"] == 1.0
    assert stats["length_baseline_accuracy"] == 1.0  # the longer, positive response is gold-better
    assert stats["eos_fraction"] == 0.75


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
def test_cut_at_eos():
    assert annotator.cut_at_eos([5, 6, 2, 7, 2], 2) == ([5, 6, 2], True)
    assert annotator.cut_at_eos([5, 6, 7], 2) == ([5, 6, 7], False)


@pytest.fixture(scope="module")
def tiny_llama():
    tokenizer = models.load_tokenizer("tiny:llama")
    return tokenizer, models.load_causal_lm("tiny:llama", tokenizer).eval()


def _prompts(tokenizer, n):
    prompts = annotator.select_prompts(annotator.load_prompt_set(), "rm", n)
    return [
        tokenizer.apply_chat_template(annotator.prompt_messages(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _generate(model, tokenizer, texts, seed, batch_size=3, samples=2, new=12):
    return annotator.generate_responses(
        model,
        tokenizer,
        texts,
        samples_per_prompt=samples,
        max_new_tokens=new,
        temperature=1.0,
        batch_size=batch_size,
        seed=seed,
        device=torch.device("cpu"),
        dtype=torch.float32,
        progress=False,
    )


def test_generation_is_seeded_batched_and_decoded(tiny_llama):
    tokenizer, model = tiny_llama
    texts = _prompts(tokenizer, 5)
    first = _generate(model, tokenizer, texts, seed=3)
    assert len(first) == 5 and all(len(row) == 2 for row in first)
    again = _generate(model, tokenizer, texts, seed=3)
    assert [[s.ids for s in row] for row in first] == [[s.ids for s in row] for row in again]
    other = _generate(model, tokenizer, texts, seed=4)
    assert [[s.ids for s in row] for row in first] != [[s.ids for s in row] for row in other]
    for row in first:
        for s in row:
            assert 1 <= len(s.ids) <= 12
            assert s.text == tokenizer.decode(s.ids[:-1] if s.finished else s.ids, skip_special_tokens=True)


def test_resume_reuses_done_batches(tiny_llama):
    tokenizer, model = tiny_llama
    texts = _prompts(tokenizer, 5)
    seen = []
    full = annotator.generate_responses(
        model,
        tokenizer,
        texts,
        samples_per_prompt=2,
        max_new_tokens=8,
        temperature=1.0,
        batch_size=2,
        seed=0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        progress=False,
        on_batch=lambda b, start, s: seen.append(b),
    )
    assert seen == [0, 1, 2]
    seen.clear()
    resumed = annotator.generate_responses(
        model,
        tokenizer,
        texts,
        samples_per_prompt=2,
        max_new_tokens=8,
        temperature=1.0,
        batch_size=2,
        seed=0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        progress=False,
        done={0: full[:2]},
        on_batch=lambda b, start, s: seen.append(b),
    )
    assert seen == [1, 2]  # batch 0 came from `done`; batches are seeded by index, so the rest match
    assert [[s.ids for s in r] for r in resumed] == [[s.ids for s in r] for r in full]


def test_eos_present_iff_finished(tiny_llama):
    """Make a token the random model emits often play EOS: sequences stop right after its first occurrence."""
    tokenizer, model = tiny_llama
    texts = _prompts(tokenizer, 4)
    free = _generate(model, tokenizer, texts, seed=5, batch_size=4, new=16)
    common = Counter(t for row in free for s in row for t in s.ids).most_common(1)[0][0]
    assert common not in (tokenizer.pad_token_id,)
    original_eos = tokenizer.eos_token
    try:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(common)
        stopped = _generate(model, tokenizer, texts, seed=5, batch_size=4, new=16)
    finally:
        tokenizer.eos_token = original_eos
    n_finished = 0
    for row_free, row_stop in zip(free, stopped):
        for f, s in zip(row_free, row_stop):
            assert s.finished == (common in f.ids)
            assert (s.ids[-1] == common) == s.finished and common not in s.ids[:-1]
            # same RNG stream: the stopped sample is the free one cut just after its first `common`
            expected = f.ids[: f.ids.index(common) + 1] if s.finished else f.ids
            assert s.ids == expected
            n_finished += s.finished
    assert n_finished > 0


# ---------------------------------------------------------------------------------------------------------------
# Responses files
# ---------------------------------------------------------------------------------------------------------------
def _records():
    return [{"prompt_id": "rm-0000", "prompt_text": "x", "responses": [{"ids": [1, 2], "text": "a", "finished": True}]}]


def test_responses_file_roundtrip_and_stable_checksum(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    sha1 = annotator.write_responses_file(path, {"model": "m"}, _records())
    sha2 = annotator.write_responses_file(path, {"model": "m"}, _records())
    assert sha1 == sha2  # gzip mtime fixed: same content, same checksum
    header, records = annotator.load_responses_file(path)
    assert header["model"] == "m" and records["rm-0000"]["responses"][0]["ids"] == [1, 2]


def test_responses_file_checksum_is_enforced(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    annotator.write_responses_file(path, {"model": "m"}, _records())
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"kind": "header", "model": "edited"}) + "\n")
    with pytest.raises(ValueError, match="sha256"):
        annotator.load_responses_file(path)
    annotator.sha_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="checksum"):
        annotator.load_responses_file(path)
    with pytest.raises(FileNotFoundError, match="use_shipped_responses: false"):
        annotator.load_responses_file(tmp_path / "missing.jsonl.gz")


def test_shipped_compatibility_names_the_setting():
    header = {
        "prompt_set": "v1",
        "model": "bundled:smollm2-135m-instruct",
        "max_new_tokens": 128,
        "temperature": 0.8,
        "samples_per_prompt": 2,
    }
    ok = {**header}
    annotator.check_shipped_compatible(header, ok, annotator.SHIPPED_RESPONSES_PATH)
    with pytest.raises(ValueError, match="max_new_tokens: file 128 vs config 64.*use_shipped_responses: false"):
        annotator.check_shipped_compatible(header, {**ok, "max_new_tokens": 64}, annotator.SHIPPED_RESPONSES_PATH)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        annotator.check_shipped_compatible(header, {**ok, "samples_per_prompt": 4}, annotator.SHIPPED_RESPONSES_PATH)


def test_shipped_responses_are_valid_and_measure_as_documented():
    header, records = annotator.load_responses_file()  # verifies the sha256
    assert header["model"] == "bundled:smollm2-135m-instruct" and header["prompt_set"] == annotator.PROMPT_SET_VERSION
    rm_ids = [p["id"] for p in annotator.select_prompts(annotator.load_prompt_set(), "rm", 1400)]
    assert set(records) == set(rm_ids)
    pairs = []
    for rec in records.values():
        samples = annotator.samples_from_record(rec)
        assert len(samples) == header["samples_per_prompt"]
        for s in samples:
            assert (s.ids[-1] == 2) == s.finished and 2 not in s.ids[:-1]  # <|im_end|> ends finished ones only
            assert len(s.ids) <= header["max_new_tokens"]
        pairs.append((samples[0], samples[1]))
    stats = annotator.pair_statistics(pairs, beta=4.0, seed=0)
    assert stats["gold_std"] > 0.3  # the gold score varies
    assert stats["gold_tie_rate"] < 0.1
    assert stats["length_baseline_accuracy"] < 0.65  # not mostly a length signal
    assert 0.65 < stats["label_gold_agreement"] < 0.9  # noisy like human labels, far from chance
    assert stats["eos_fraction"] > 0.6
