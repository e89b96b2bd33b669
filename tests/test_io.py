"""Tests for rlhf_lib.core.io: the JSONL error rule, atomic writes and padding."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from rlhf_lib.core import io


def test_jsonl_round_trip_keeps_unicode_and_skips_blank_lines(tmp_path):
    rows = [{"a": 1, "text": "café ☕"}, {"a": 2, "nested": {"x": [1, 2]}}]
    path = tmp_path / "sub" / "rows.jsonl"
    io.write_jsonl(path, rows)
    assert "café ☕" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    path.write_text(path.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")
    assert io.read_jsonl(path) == rows
    assert [n for n, _ in io.iter_jsonl(path)] == [1, 2]


@pytest.mark.parametrize(
    "line, kind, detail",
    [
        (b'{"a": 1', "malformed_json", "malformed JSON"),
        (b"[1, 2]", "not_an_object", "expected a JSON object, got list"),
        (b'{"a": "caf\xe9"}', "not_utf8", r"not UTF-8 text \(byte 0xe9 at column 11\)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, kind, detail):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"ok": 1}\n\n' + line + b'\n{"ok": 2}\n')
    with pytest.raises(io.JSONLError, match=rf"x.jsonl line 3: {detail}") as info:
        io.read_jsonl(path)
    assert (info.value.kind, info.value.line_no) == (kind, 3)
    seen = []
    assert [r["ok"] for _, r in io.iter_jsonl(path, on_bad_line=seen.append)] == [1, 2]
    assert [(e.kind, e.line_no) for e in seen] == [(kind, 3)]


def test_torn_tail_only_forgiven_when_asked_and_only_at_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"update": 1}\n{"update": 2}\n{"upd')  # a write cut short by a kill
    assert io.read_jsonl(path, torn_tail_ok=True) == [{"update": 1}, {"update": 2}]
    with pytest.raises(io.JSONLError, match="line 3"):
        io.read_jsonl(path)
    path.write_bytes(b'{"update": 1}\n{"upd\n{"update": 3}\n')  # a bad line in the middle is no torn tail
    with pytest.raises(io.JSONLError, match="line 2"):
        io.read_jsonl(path, torn_tail_ok=True)


def test_missing_file(tmp_path):
    assert io.read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        io.read_jsonl(tmp_path / "none.jsonl")


def test_utf8_bom_on_the_first_line_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert io.read_jsonl(path) == [{"a": 1}]


def test_append_adds_lines_to_a_log(tmp_path):
    path = tmp_path / "log" / "m.jsonl"
    io.append_jsonl(path, [{"u": 1}])
    io.append_jsonl(path, [{"u": 2}, {"u": 3}])
    assert io.read_jsonl(path) == [{"u": 1}, {"u": 2}, {"u": 3}]


def test_atomic_write_replaces_whole_file_with_usual_permissions(tmp_path):
    path = tmp_path / "r.json"
    io.write_json_atomic(path, {"a": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "p": str(tmp_path)}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600
    io.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.txt"
    io.write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_pad_left_and_right():
    ids, mask = io.pad([[5, 6, 7], [8], []], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = io.pad([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="side must be"):
        io.pad([[1]], 0, side="middle")


def test_pad_keeps_real_tokens_equal_to_the_pad_id_unmasked():
    ids, mask = io.pad([[0, 3], [4]], pad_id=0, side="left")  # token 0 is real in row 0
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert io.pad([], 0)[0].shape == (0, 0)
