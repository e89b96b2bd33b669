"""Tests for rlhf_lib.data (build, formats, records, plots): formats, prompt/response splitting, chat
templating, splits, bad input, end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_lib.core import config, runs
from rlhf_lib.data import annotator
from rlhf_lib.data import build as data
from rlhf_lib.data import formats as data_formats
from rlhf_lib.data import plots as data_plots
from rlhf_lib.data import records as data_records
from rlhf_lib.data.build import DataConfig
from rlhf_lib.data.formats import DataError
from rlhf_lib.lm import models

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAIR_KEYS = {
    "id",
    "prompt",
    "prompt_text",
    "chosen",
    "rejected",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "score_chosen",
    "score_rejected",
    "gold_chosen",
    "gold_rejected",
    "margin",
}
PROMPT_KEYS = {"id", "prompt", "prompt_text", "prompt_ids"}


@pytest.fixture(scope="module")
def tok_llama():
    return models.load_tokenizer("tiny:llama")


@pytest.fixture(scope="module")
def tok_gpt2():
    return models.load_tokenizer("tiny:gpt2")


def real_cfg(tmp_path, dataset, **kw) -> DataConfig:
    base = dict(
        model="tiny:llama",
        dataset=str(dataset),
        outputs_dir=str(tmp_path),
        run="r",
        n_ppo_prompts=3,
        n_eval_prompts=2,
        overwrite=True,
    )
    return DataConfig(**{**base, **kw})


def prepare(cfg):
    return data.prepare_data(cfg, runs.run_for(cfg))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def plain_rows(n=12):
    return [{"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"Bad {i}."} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def test_config_fields_documented_and_valid():
    comments = config.field_comments(DataConfig)
    for f in dataclasses.fields(DataConfig):
        assert comments.get(f.name), f"field {f.name} lacks a # comment"
    DataConfig().check()


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"dataset_format": "csv"}, "dataset_format"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"max_response_length": 0}, "max_response_length"),
        ({"samples_per_prompt": 1}, "samples_per_prompt"),
        ({"generation_temperature": 0.0}, "generation_temperature"),
        ({"on_bad_row": "skip"}, "on_bad_row"),
        ({"n_ppo_prompts": -1}, "n_ppo_prompts"),
        ({"annotator_beta": -1.0}, "annotator_beta"),
    ],
)
def test_config_check_rejects(kw, msg):
    with pytest.raises(config.ConfigError, match=msg):
        config.validate(DataConfig, kw, "test")


# ---------------------------------------------------------------------------------------------------------------
# Formats and normalisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fmt",
    [
        ("ultrafeedback.jsonl", "ultrafeedback"),
        ("hh.jsonl", "hh"),
        ("plain.jsonl", "plain"),
        ("plain.csv", "plain"),
        ("plain.parquet", "plain"),
    ],
)
def test_each_format_normalises_to_the_same_pairs(name, fmt):
    raw = data_formats.load_raw(str(FIXTURES / name))
    assert data_formats.detect_format(raw) == fmt
    examples, dropped = data_formats.normalise(raw, fmt, "error")
    assert len(examples) == 12 and not dropped
    first = examples[1]  # a single-turn row in every fixture
    assert first.prompt == [{"role": "user", "content": "Name a primary colour."}]
    assert (first.chosen, first.rejected) == ("Red is a primary colour.", "Colours are nice.")
    if fmt == "ultrafeedback":
        assert (first.score_chosen, first.score_rejected) == (7.0, 3.5)
    else:
        assert first.score_chosen is None


def test_h4_ultrafeedback_layout_with_prompt_column_is_conversational(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized also has a `prompt` string; chosen/rejected are whole conversations."""
    user = {"role": "user", "content": "Hi?"}
    rows = [
        {
            "prompt": "Hi?",
            "chosen": [user, {"role": "assistant", "content": "Hello!"}],
            "rejected": [user, {"role": "assistant", "content": "No."}],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
    ]
    raw = data_formats.load_raw(str(write_jsonl(tmp_path / "h4.jsonl", rows)))
    assert data_formats.detect_format(raw) == "ultrafeedback"
    ex = data_formats.normalise(raw, "ultrafeedback", "error")[0][0]
    assert ex.prompt == [user] and (ex.chosen, ex.rejected) == ("Hello!", "No.")


def test_hh_multi_turn_prompt_keeps_earlier_turns():
    raw = data_formats.load_raw(str(FIXTURES / "hh.jsonl"))
    ex = data_formats.normalise(raw, "hh", "error")[0][0]
    assert ex.prompt == [
        {"role": "user", "content": "Hi, I have a question."},
        {"role": "assistant", "content": "Sure, go ahead."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert ex.chosen == "The capital of France is Paris." and ex.rejected == "France is a country in Europe."


@pytest.mark.parametrize(
    "text, msg",
    [("Hello there", "no '\\\\n\\\\nHuman:'"), ("Preamble\n\nHuman: hi\n\nAssistant: yo", "text before")],
)
def test_parse_hh_rejects_non_hh_text(text, msg):
    with pytest.raises(data_formats.RowError, match=msg):
        data_formats.parse_hh(text, "chosen")


def test_plain_with_conversational_prompt_and_completions():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    ex = data_formats.normalise_row(row, "plain", "x")
    assert ex.prompt[0]["role"] == "system" and (ex.chosen, ex.rejected) == ("Hello.", "Go away.")


# ---------------------------------------------------------------------------------------------------------------
# Chat templating and prompt/response splitting
# ---------------------------------------------------------------------------------------------------------------
MSGS = [{"role": "user", "content": "Name a primary colour."}]


def test_chat_template_of_a_model_with_a_template(tok_llama):
    fmt = data_records.ChatFormatter(tok_llama)
    text = fmt.prompt_text(MSGS)
    assert text.endswith("<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n")
    assert fmt.response_prefix == ""
    ids = fmt.response_ids("Red.")
    assert ids[-1] == tok_llama.eos_token_id == tok_llama.convert_tokens_to_ids("<|im_end|>")
    # prompt + response tokens render the same conversation as the template itself
    full = tok_llama.apply_chat_template(MSGS + [{"role": "assistant", "content": "Red."}], tokenize=False)
    assert full.startswith(tok_llama.decode(fmt.ids(text) + ids))
    assert fmt.decode_response(ids) == "Red."


def test_chat_template_of_a_model_without_one(tok_gpt2):
    assert tok_gpt2.chat_template == models.SIMPLE_CHAT_TEMPLATE
    fmt = data_records.ChatFormatter(tok_gpt2)
    text = fmt.prompt_text(MSGS)
    assert text == "User: Name a primary colour.\n\nAssistant:"
    assert fmt.response_prefix == " "  # the policy writes " Red." after "Assistant:"
    ids = fmt.response_ids("Red.")
    assert ids[-1] == tok_gpt2.eos_token_id and tok_gpt2.eos_token == "<|endoftext|>"
    assert ids[-1] != tok_gpt2.pad_token_id
    full = tok_gpt2.apply_chat_template(MSGS + [{"role": "assistant", "content": "Red."}], tokenize=False)
    assert full.startswith(tok_gpt2.decode(fmt.ids(text) + ids))
    assert fmt.decode_response(ids) == "Red."


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_written_pairs_follow_the_contract(tmp_path, model):
    cfg = real_cfg(tmp_path, FIXTURES / "ultrafeedback.jsonl", model=model)
    report = prepare(cfg)
    run = runs.run_for(cfg)
    tok = models.load_tokenizer(model)
    pairs = data.load_split(run, "train_pairs") + data.load_split(run, "eval_pairs")
    assert len(pairs) == report.summary["n_train_pairs"] + report.summary["n_eval_pairs"]
    for p in pairs:
        assert PAIR_KEYS <= set(p)
        assert p["prompt_text"] == tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
        assert p["prompt_ids"] == tok(p["prompt_text"], add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            assert p[f"{side}_ids"][-1] == tok.eos_token_id  # complete responses end with EOS ...
            assert tok.eos_token_id not in p[f"{side}_ids"][:-1]  # ... and only there
        assert p["margin"] == pytest.approx(p["score_chosen"] - p["score_rejected"])
        assert p["gold_chosen"] is None
    for name in ("ppo_prompts", "eval_prompts"):
        for p in data.load_split(run, name):
            assert set(p) == PROMPT_KEYS  # prompts only: no answers leak into PPO
            assert p["prompt_text"].endswith("<|im_start|>assistant\n" if model == "tiny:llama" else "Assistant:")


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------
def _texts(run, name):
    return {p["prompt_text"] for p in data.load_split(run, name)}


@pytest.mark.parametrize("name", ["ultrafeedback.jsonl", "hh.jsonl", "plain.csv"])
def test_no_prompt_overlap_between_rm_ppo_eval(tmp_path, name):
    cfg = real_cfg(tmp_path, FIXTURES / name, eval_fraction=0.3)
    report = prepare(cfg)
    run = runs.run_for(cfg)
    train, held, ppo, ev = (_texts(run, n) for n in ("train_pairs", "eval_pairs", "ppo_prompts", "eval_prompts"))
    assert train and held and ppo and ev
    assert not train & held and not ev & (train | held | ppo) and not ppo & (train | held)
    assert report.report["overlap"] == {
        "rm_train_and_rm_eval": 0,
        "ppo_and_rm": 0,
        "eval_prompts_and_rm": 0,
        "eval_prompts_and_ppo": 0,
    }
    assert report.summary["n_train_pairs"] + report.summary["n_eval_pairs"] + 3 + 2 == 12


def test_ppo_prompts_top_up_from_rm_train_when_data_is_small(tmp_path):
    report = prepare(real_cfg(tmp_path, FIXTURES / "plain.jsonl", n_ppo_prompts=6))
    assert report.summary["n_ppo_prompts"] == 6
    # 12 prompts: 2 eval, 4 PPO (half stay for RM pairs), 6 RM; the other 2 PPO prompts are RM training prompts
    assert report.report["ppo_prompts_shared_with_rm_train"] == 2 == report.report["overlap"]["ppo_and_rm"]
    assert (
        report.report["overlap"]["eval_prompts_and_rm"] == 0 and report.report["overlap"]["rm_train_and_rm_eval"] == 0
    )


def test_splits_deterministic_under_seed(tmp_path):
    def files(seed, sub):
        cfg = real_cfg(tmp_path / sub, FIXTURES / "plain.jsonl", seed=seed, eval_fraction=0.3)
        prepare(cfg)
        return {n: (runs.run_for(cfg).data_dir / n).read_text() for n in data.OUTPUT_FILES}

    assert files(0, "a") == files(0, "b")
    assert files(0, "a") != files(1, "c")


def test_seeded_order_ignores_input_order():
    keys = [f"k{i}" for i in range(50)]
    assert data.seeded_order(keys, 3) == data.seeded_order(list(reversed(keys)), 3)
    assert data.seeded_order(keys, 3) != data.seeded_order(keys, 4)


@pytest.mark.parametrize(
    "n, want, expected",
    [(12, (2, 3), (2, 3)), (12, (128, 256), (3, 3)), (1000, (128, 256), (128, 256)), (3, (2, 2), (0, 1))],
)
def test_prompt_split_sizes_keep_half_for_rm(n, want, expected):
    assert data.prompt_split_sizes(n, *want) == expected


def test_max_pairs_caps_pairs(tmp_path):
    report = prepare(real_cfg(tmp_path, FIXTURES / "plain.jsonl", max_pairs=4))
    assert report.summary["n_train_pairs"] + report.summary["n_eval_pairs"] == 4
    assert report.report["rows_not_used_for_pairs"] == 12 - 4


# ---------------------------------------------------------------------------------------------------------------
# Length limits
# ---------------------------------------------------------------------------------------------------------------
def test_long_responses_are_truncated_without_eos_and_counted(tmp_path, tok_llama):
    report = prepare(real_cfg(tmp_path, FIXTURES / "plain.jsonl", max_response_length=5))
    pairs = data.load_split(runs.run_for(real_cfg(tmp_path, "x")), "train_pairs")
    assert report.truncated["chosen"] > 0
    assert sum(report.truncated.values()) == report.report["truncated_responses"]["chosen"] + report.report[
        "truncated_responses"
    ].get("rejected", 0)
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_ids"]
            assert len(ids) <= 5
            if len(ids) == 5 and tok_llama.eos_token_id not in ids:
                assert p[side] == tok_llama.decode(ids, skip_special_tokens=True)  # text matches the kept tokens


def test_long_responses_dropped_when_truncation_is_off(tmp_path):
    report = prepare(real_cfg(tmp_path, FIXTURES / "plain.jsonl", max_response_length=6, truncate_responses=False))
    assert report.dropped["response_too_long"] > 0
    assert report.summary["n_dropped"] == sum(report.dropped.values())
    assert not report.truncated


def test_long_prompts_dropped_and_counted(tmp_path, tok_llama):
    rows = plain_rows()
    rows[0]["prompt"] = rows[1]["prompt"] = "word " * 300
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows), max_prompt_length=64))
    total_prompt_drops = report.dropped.get("prompt_too_long", 0) + report.report["dropped_prompts"].get(
        "prompt_too_long", 0
    )
    assert total_prompt_drops == 2


def test_everything_filtered_is_a_clear_error(tmp_path):
    cfg = real_cfg(tmp_path, FIXTURES / "plain.jsonl", max_prompt_length=5)
    with pytest.raises(DataError, match="no training pairs left after filtering.*prompt_too_long"):
        prepare(cfg)
    assert not runs.run_for(cfg).data_dir.exists() or not any(
        runs.run_for(cfg).data_dir.iterdir()
    )  # nothing half-written


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_missing_column_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "nocol.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"nocol.jsonl: missing column\(s\) \['rejected'\]"):
        prepare(real_cfg(tmp_path, path, dataset_format="plain"))


def test_undetectable_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="odd.jsonl: cannot detect the dataset format.*dataset_format"):
        prepare(real_cfg(tmp_path, path))


@pytest.mark.parametrize(
    "bad, field, msg",
    [
        ({"prompt": "  "}, "prompt", "is empty"),
        ({"chosen": 42}, "chosen", "must be a string, got int"),
        ({"prompt": None}, "prompt", "must be a string, got NoneType"),
        ({"score_chosen": "high"}, "score_chosen", "must be a number"),
    ],
)
def test_bad_values_name_file_line_and_field(tmp_path, bad, field, msg):
    rows = plain_rows()
    rows[4].update(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad.jsonl line 5, field '{field}': field '{field}' {msg}"):
        prepare(real_cfg(tmp_path, path))


def test_missing_field_in_one_row(tmp_path):
    rows = plain_rows()
    del rows[6]["chosen"]
    with pytest.raises(DataError, match="line 7, field 'chosen': field 'chosen' is missing"):
        prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "m.jsonl", rows)))


def test_non_utf8_line_names_file_and_line_and_is_dropped_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", plain_rows())
    lines = path.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"A good answer", b"A g\xf6\xf6d answer")  # Latin-1 bytes
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"latin1.jsonl line 6: not UTF-8 text \(byte 0xf6 .*on_bad_row: drop"):
        prepare(real_cfg(tmp_path, path))
    report = prepare(real_cfg(tmp_path, path, on_bad_row="drop"))
    assert report.dropped == {"not_utf8": 1}


def test_csv_that_does_not_parse_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected\nq1,a,b\nq2,a, b,extra\nq3,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv: not a valid CSV file \(.*Expected 3 fields in line 3, saw 4.*quote"):
        prepare(real_cfg(tmp_path, path))
    path.write_bytes(b"prompt,chosen,rejected\nq1,caf\xe9,b\n")
    with pytest.raises(DataError, match="bad.csv: not UTF-8 text"):
        prepare(real_cfg(tmp_path, path))


def test_csv_reads_like_the_jsonl(tmp_path):
    rows = data_formats.load_raw(str(FIXTURES / "plain.csv")).rows
    assert rows == [json.loads(line) for line in (FIXTURES / "plain.jsonl").read_text().splitlines()]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", plain_rows())
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="broken.jsonl line 3: malformed JSON"):
        prepare(real_cfg(tmp_path, path))
    report = prepare(real_cfg(tmp_path, path, on_bad_row="drop"))
    assert report.dropped == {"malformed_json": 1}


def test_bad_rows_dropped_and_counted_when_asked(tmp_path):
    rows = plain_rows()
    rows[0]["prompt"] = ""
    rows[1]["rejected"] = 7
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "b.jsonl", rows), on_bad_row="drop"))
    assert report.dropped == {"bad_row:empty_text": 1, "bad_row:non_string_text": 1}
    assert report.summary["n_dropped"] == 2


@pytest.mark.parametrize("on_bad_row", ["error", "drop"])
def test_empty_completions_dropped_and_counted_whatever_on_bad_row(tmp_path, on_bad_row):
    rows = plain_rows()
    rows[0]["chosen"], rows[4]["rejected"], rows[7]["chosen"] = "", "   ", "\n\t"
    rows[9]["rejected"] = rows[9]["chosen"]  # identical: its own reason
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "e.jsonl", rows), on_bad_row=on_bad_row))
    assert report.dropped == {"empty_response": 3, "identical_responses": 1}
    assert report.report["dropped_pairs"] == report.dropped and report.summary["n_dropped"] == 4
    kept = {p["prompt"][-1]["content"] for p in data.load_split(runs.run_for(real_cfg(tmp_path, "x")), "train_pairs")}
    assert not kept & {"Question 0?", "Question 4?", "Question 7?", "Question 9?"}


def test_empty_last_message_of_a_conversation_is_an_empty_completion(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()]
    rows[3]["rejected"][-1]["content"] = " "
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows)))
    assert report.dropped == {"empty_response": 1}
    rows[3]["rejected"][0]["content"] = ""  # an empty prompt turn stays a row error
    with pytest.raises(DataError, match=r"uf.jsonl line 4, field 'rejected\[0\].content'.*is empty"):
        prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows)))


def test_hh_rlhf_with_empty_final_replies_passes_with_the_defaults(tmp_path):
    """Anthropic/hh-rlhf has rows whose last assistant reply is empty; the defaults must still build the data."""
    cfg = DataConfig(dataset=str(FIXTURES / "hh_empty_replies.jsonl"), outputs_dir=str(tmp_path), run="hh")
    assert cfg.on_bad_row == "error"  # the default, which stays strict about structural faults
    report = prepare(cfg)
    saved = json.loads((runs.run_for(cfg).data_dir / "report.json").read_text())
    assert saved["format"] == "hh" and saved["rows"] == 12
    assert saved["dropped_pairs"] == {"empty_response": 3}
    assert report.summary["n_train_pairs"] + report.summary["n_eval_pairs"] > 0
    for name in ("train_pairs", "eval_pairs"):
        for pair in data.load_split(runs.run_for(cfg), name):
            assert pair["chosen"].strip() and pair["rejected"].strip()


def test_identical_chosen_and_rejected_dropped_and_counted(tmp_path):
    rows = plain_rows()
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[8]["rejected"] = rows[8]["chosen"] + "  "
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "same.jsonl", rows)))
    assert report.dropped == {"identical_responses": 2} and report.summary["n_dropped"] == 2


def test_all_identical_is_an_empty_dataset_error(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(5)]
    with pytest.raises(DataError, match="no usable pairs left after filtering.*identical_responses"):
        prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "same.jsonl", rows)))


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the dataset has no rows"):
        prepare(real_cfg(tmp_path, tmp_path / "empty.jsonl", dataset_format="plain"))
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        prepare(real_cfg(tmp_path, tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        prepare(real_cfg(tmp_path, tmp_path / "x.txt"))


def test_json_list_file_and_relative_path_from_repo_root(tmp_path, monkeypatch):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(plain_rows()))
    raw = data_formats.load_raw(str(path))
    assert len(raw.rows) == 12 and raw.labels[3] == "item 3"
    path.write_text(json.dumps({"prompt": "q"}))
    with pytest.raises(DataError, match="pairs.json: expected a JSON list of objects"):
        data_formats.load_raw(str(path))
    monkeypatch.chdir(tmp_path)  # as when papermill runs a notebook from another folder
    assert len(data_formats.load_raw("tests/fixtures/hh.jsonl").rows) == 12


def test_csv_empty_cell_names_row_and_field(tmp_path):
    frame = pd.DataFrame(plain_rows())
    frame.loc[2, "chosen"] = None
    frame.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match="c.csv row 2, field 'chosen'"):
        prepare(real_cfg(tmp_path, tmp_path / "c.csv"))


def test_conversation_errors(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()]
    rows[5]["rejected"][0]["content"] = "A different question?"  # prompts differ: dropped and counted
    rows[7]["chosen"] = rows[7]["chosen"][:1]  # the conversation ends with the user: an error
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    with pytest.raises(DataError, match="uf.jsonl line 8, field 'chosen'.*last message"):
        prepare(real_cfg(tmp_path, path))
    del rows[7]
    report = prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows)))
    assert report.dropped == {"prompt_mismatch": 1}
    rows[2]["chosen"][1] = {"role": "bot", "content": "x"}
    with pytest.raises(DataError, match="line 3, field 'chosen'.*role 'bot'"):
        prepare(real_cfg(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows)))


# ---------------------------------------------------------------------------------------------------------------
# Simulated data end to end (tiny model)
# ---------------------------------------------------------------------------------------------------------------
def sim_cfg(tmp_path, **kw) -> DataConfig:
    base = dict(
        model="tiny:llama",
        dataset="simulated",
        use_shipped_responses=False,
        outputs_dir=str(tmp_path),
        run="sim",
        n_rm_prompts=20,
        samples_per_prompt=2,
        generation_max_new_tokens=10,
        generation_batch_size=10,
        n_ppo_prompts=8,
        n_eval_prompts=4,
        eval_fraction=0.25,
        dtype="float32",
    )
    return DataConfig(**{**base, **kw})


def test_prepare_data_simulated_end_to_end(tmp_path):
    cfg = sim_cfg(tmp_path)
    run = runs.start_stage(cfg, "data")
    report = data.prepare_data(cfg, run)
    s = report.summary
    assert set(s) == {
        "n_train_pairs",
        "n_eval_pairs",
        "n_ppo_prompts",
        "n_eval_prompts",
        "n_dropped",
        "label_gold_agreement",
        "length_baseline_accuracy",
    }
    assert s["n_train_pairs"] + s["n_eval_pairs"] + s["n_dropped"] == 20
    assert s["n_eval_pairs"] == 5 and (s["n_ppo_prompts"], s["n_eval_prompts"]) == (8, 4)
    assert report.report["gold_scorer"] == "vader" and report.report["annotator_beta"] == 4.0
    tok = models.load_tokenizer("tiny:llama")
    pairs = data.load_split(run, "train_pairs") + data.load_split(run, "eval_pairs")
    for p in pairs:
        assert PAIR_KEYS <= set(p) and p["margin"] is None and p["score_chosen"] is None
        assert annotator.gold_scores([p["chosen"], p["rejected"]]) == [p["gold_chosen"], p["gold_rejected"]]
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_ids"]
            assert len(ids) <= 10 and tok.eos_token_id not in ids[:-1]
    # RM, PPO and eval prompts come from disjoint splits of the prompt set
    prompt_set = {q["id"]: q for q in annotator.load_prompt_set()}
    assert {prompt_set[p["prompt_id"]]["split"] for p in pairs} == {"rm"}
    assert {prompt_set[p["id"]]["split"] for p in data.load_split(run, "ppo_prompts")} == {"ppo"}
    assert {prompt_set[p["id"]]["split"] for p in data.load_split(run, "eval_prompts")} == {"eval"}
    runs.finish_stage(run, "data", s)
    assert run.summary()["data"] == json.loads(json.dumps(s))
    fig = data_plots.plot_data_overview(run)
    assert len(fig.axes) == 3 and (run.plots_dir / "data_overview.png").exists()
    frame = data.sample_pairs(run, n=3)
    assert len(frame) == 3 and {"prompt", "chosen", "rejected", "gold_chosen"} <= set(frame.columns)
    assert "n_train_pairs" in report._repr_html_()


def test_simulated_is_deterministic_under_seed(tmp_path):
    def files(sub, seed):
        cfg = sim_cfg(tmp_path / sub, seed=seed, n_rm_prompts=8, generation_max_new_tokens=6)
        prepare(cfg)
        return [(runs.run_for(cfg).data_dir / n).read_text() for n in data.OUTPUT_FILES[:2]]

    assert files("a", 0) == files("b", 0)
    assert files("a", 0) != files("c", 1)


def test_shipped_responses_refuse_another_model(tmp_path):
    with pytest.raises(
        ValueError,
        match="model: file 'bundled:smollm2-135m-instruct' vs config 'tiny:llama'.*use_shipped_responses: false",
    ):
        prepare(sim_cfg(tmp_path, use_shipped_responses=True, generation_max_new_tokens=128))


@pytest.mark.slow
def test_default_profile_with_shipped_responses(tmp_path):
    """The offline default: bundled SmolLM2's tokenizer + the shipped responses (no generation, seconds)."""
    if not annotator.SHIPPED_RESPONSES_PATH.exists():
        pytest.skip("shipped responses not generated yet")
    cfg = DataConfig(model="bundled:smollm2-135m-instruct", outputs_dir=str(tmp_path), run="default")
    report = prepare(cfg)
    s = report.summary
    assert s["n_train_pairs"] + s["n_eval_pairs"] + s["n_dropped"] == 1400
    assert (s["n_ppo_prompts"], s["n_eval_prompts"]) == (256, 128)
    assert 0.65 < s["label_gold_agreement"] < 0.9 and s["length_baseline_accuracy"] < 0.65
    assert report.report["responses"] == "shipped" and report.report["truncated_responses"] == {}


# ---------------------------------------------------------------------------------------------------------------
# Long responses: tokenised from a bounded prefix
# ---------------------------------------------------------------------------------------------------------------
def test_long_response_tokenised_from_a_prefix_equals_whole_then_cut(tok_llama):
    fmt = data_records.ChatFormatter(tok_llama)
    words = "The quick brown fox jumps over the lazy dog, then naps; café, naïve, 42%! ".split(" ")
    text = " ".join(words[i % len(words)] for i in range(600))  # ~4,000 characters, ~1,000 tokens
    whole = fmt.response_ids(text)
    for max_len in (1, 16, 64):
        # the prefix path runs
        assert len(text) > data_records.CHARS_PER_TOKEN_CAP * (max_len + data_records.CUT_MARGIN_TOKENS)
        capped = fmt.response_ids(text, max_len)
        assert len(capped) > max_len and capped[:max_len] == whole[:max_len]
        assert data_records.fit_response(fmt, capped, text, max_len, True) == data_records.fit_response(
            fmt, whole, text, max_len, True
        )
        assert data_records.fit_response(fmt, capped, text, max_len, False) is None
    short = "A short answer."
    assert fmt.response_ids(short, 64) == fmt.response_ids(short) == fmt.ids(fmt.response_prefix + short) + [fmt.eos_id]


def test_long_response_prefix_grows_when_tokens_are_long(tok_llama):
    fmt = data_records.ChatFormatter(tok_llama)
    text = " " * 20_000 + "end"  # runs of spaces: many characters per token, the first prefix is not enough
    assert fmt.response_ids(text, 16)[:16] == fmt.response_ids(text)[:16]


def test_huge_response_is_tokenised_from_a_bounded_prefix(tok_llama, monkeypatch):
    fmt = data_records.ChatFormatter(tok_llama)
    seen = []
    ids = fmt.ids
    monkeypatch.setattr(fmt, "ids", lambda text: seen.append(len(text)) or ids(text))
    out = fmt.response_ids("lorem ipsum dolor sit amet " * 400_000, 128)  # ~10 MB
    assert len(out) > 128
    assert max(seen) <= 16 * data_records.CHARS_PER_TOKEN_CAP * (128 + data_records.CUT_MARGIN_TOKENS)
