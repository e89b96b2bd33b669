"""Reading a preference dataset and checking its rows: local files, dataset folders and hub datasets, in one of
three formats, normalised to :class:`Example` (prompt messages, chosen and rejected completions, optional scores).

Sources: a hub id, or a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or dataset folder (:func:`load_raw`).
Formats (``dataset_format: auto`` detects them from the columns, :func:`detect_format`):

* ``ultrafeedback`` (``trl-lib/ultrafeedback_binarized``): ``chosen``/``rejected`` are whole conversations (lists of
  ``{"role", "content"}``); the prompt is their shared prefix, the completion their last (assistant) message;
  optional ``score_chosen``/``score_rejected``.
* ``hh`` (``Anthropic/hh-rlhf``): ``chosen``/``rejected`` are plain text with ``"\\n\\nHuman: "`` /
  ``"\\n\\nAssistant: "`` turns; the prompt is every turn before the last assistant turn (multi-turn prompts are
  kept as chat messages).
* ``plain``: ``prompt`` (string or messages) + ``chosen``/``rejected`` (strings, or message lists whose last
  message is the completion), optional scores.

A malformed row raises :class:`DataError` naming the file, the row and the field (or is counted with
``on_bad_row: drop``); data-quality drops are always counted (:func:`normalise`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lib.core import io

FORMATS = ("auto", "ultrafeedback", "hh", "plain")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field, and the fix."""


class RowError(ValueError):
    """A problem with one row (turned into a DataError with the row's location, or counted when dropping)."""

    def __init__(self, kind: str, field_name: str, message: str):
        super().__init__(message)
        self.kind, self.field_name = kind, field_name


# ----------------------------------------------------------------------------------------------------------------
# Loading raw rows
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RawRows:
    """Rows of a dataset as dicts, with where they came from (for error messages)."""

    source: str
    rows: list[dict[str, Any]]
    labels: list[str]  # "line 7" / "row 3": where each row is in the source
    columns: list[str]
    dropped: Counter = field(default_factory=Counter)


def _read_jsonl(path: Path, on_bad_row: str) -> RawRows:
    """Read a .jsonl file line by line so a bad line (not UTF-8, not a JSON object) is reported with its number."""
    dropped: Counter = Counter()

    def bad_line(err: io.JSONLError) -> None:
        if on_bad_row != "drop":
            raise DataError(f"{err}. Fix or remove the line, or set on_bad_row: drop to skip such lines") from None
        dropped[err.kind] += 1

    rows, labels = [], []
    for line_no, row in io.iter_jsonl(path, on_bad_line=bad_line):
        rows.append(row)
        labels.append(f"line {line_no}")
    columns = list(rows[0]) if rows else []
    return RawRows(str(path), rows, labels, columns, dropped)


def _read_json(path: Path) -> RawRows:
    """A .json file holding a list of objects."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
        raise DataError(f"{path}: expected a JSON list of objects (one per pair); for one object per line use .jsonl")
    return RawRows(str(path), items, [f"item {i}" for i in range(len(items))], list(items[0]) if items else [])


def _from_hf(ds, source: str) -> RawRows:
    rows = ds.to_list()
    return RawRows(source, rows, [f"row {i}" for i in range(len(rows))], list(ds.column_names))


def _read_csv(path: Path) -> RawRows:
    """A .csv file with a header row; a parse error names the file and what pandas found wrong (with its line)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; a .csv needs a header row (prompt,chosen,rejected)") from None
    except pd.errors.ParserError as err:
        raise DataError(
            f"{path}: not a valid CSV file ({str(err).strip()}); quote fields that hold commas, quotes "
            f"or line breaks, or convert the file to .jsonl"
        ) from None
    # an empty cell reads as NaN: None for the row checks (a number column keeps its numbers)
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return RawRows(str(path), rows, [f"row {i}" for i in range(len(rows))], list(frame.columns))


def _load_folder(path: Path, split: str):
    """A dataset folder: one written by ``save_to_disk``, or a folder of data files ``load_dataset`` reads."""
    import datasets

    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    try:
        ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the folder
        found = sorted(p.name for p in path.iterdir())[:5]
        raise DataError(
            f"data.dataset {path} is a folder but no dataset could be read from it ({type(err).__name__}; it holds "
            f"{found or 'nothing'}); give a .jsonl / .json / .csv / .parquet file, a folder of such files, or a "
            f"folder written by Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"data.dataset {path} has splits {sorted(ds)}, not {split!r}; set data.dataset_split to one"
            )
        ds = ds[split]
    return ds


def load_raw(dataset: str, split: str = "train", on_bad_row: str = "error") -> RawRows:
    """Rows of a local file / dataset folder / hub dataset (``datasets.load_dataset``)."""
    import datasets

    path = io.local_path(dataset)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, on_bad_row)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            try:
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            except Exception as err:  # noqa: BLE001 - re-raised with the file named
                raise DataError(f"{path}: could not be read as parquet ({type(err).__name__}: {err})") from err
            return _from_hf(ds, str(path))
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.is_dir():
        return _from_hf(_load_folder(path, split), f"{path} [{split}]")
    if path.suffix.lower() in LOCAL_SUFFIXES or dataset.startswith((".", "/", "~")):
        raise DataError(
            f"dataset file {path} does not exist (relative paths are tried from {os.getcwd()} and the repo root)"
        )
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"could not load hub dataset {dataset!r} split {split!r} ({type(err).__name__}: {err}). Offline? Use "
            f"dataset: simulated, or a local file in one of the formats of rlhf_lib/data/formats.py"
        ) from err
    return _from_hf(ds, f"{dataset} [{split}]")


# ----------------------------------------------------------------------------------------------------------------
# Normalising rows to (prompt messages, chosen text, rejected text, scores)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One normalised preference pair before tokenisation."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    score_chosen: float | None
    score_rejected: float | None
    where: str  # source + row, for messages


REQUIRED_COLUMNS = {
    "ultrafeedback": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "plain": ("prompt", "chosen", "rejected"),
}


def detect_format(raw: RawRows) -> str:
    """Guess the format from the columns and the first row."""
    cols = set(raw.columns)
    first = raw.rows[0] if raw.rows else {}
    if {"chosen", "rejected"} <= cols:
        if "prompt" in cols and not (isinstance(first.get("chosen"), list) and len(first["chosen"]) > 1):
            return "plain"
        if isinstance(first.get("chosen"), list):
            return "ultrafeedback"
        if isinstance(first.get("chosen"), str) and "\n\nAssistant:" in first["chosen"]:
            return "hh"
    raise DataError(
        f"{raw.source}: cannot detect the dataset format from columns {sorted(cols)}. Expected chosen + rejected "
        f"(ultrafeedback: message lists; hh: '\\n\\nHuman: ... \\n\\nAssistant: ...' text) or prompt + chosen + "
        f"rejected (plain); set dataset_format to force one"
    )


def _text(value: Any, field_name: str, allow_empty: bool = False) -> str:
    """A string field; ``allow_empty`` for a completion, whose emptiness normalise counts instead of refusing."""
    if not isinstance(value, str):
        raise RowError(
            "non_string_text", field_name, f"field {field_name!r} must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise RowError("empty_text", field_name, f"field {field_name!r} is empty")
    return value


def _messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(
            "bad_messages", field_name, f"field {field_name!r} must be a non-empty list of {{role, content}} messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(
                "bad_messages", field_name, f"field {field_name!r} message {i} must have 'role' and 'content'"
            )
        if m["role"] not in ROLES:
            raise RowError(
                "bad_messages",
                field_name,
                f"field {field_name!r} message {i} has role {m['role']!r}, not one of {ROLES}",
            )
        completion = i == len(value) - 1 and m["role"] == "assistant"
        out.append({"role": m["role"], "content": _text(m["content"], f"{field_name}[{i}].content", completion)})
    return out


def _score(row: dict[str, Any], name: str) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("bad_score", name, f"field {name!r} must be a number or null, got {type(value).__name__}")
    return None if math.isnan(value) else float(value)


def _split_conversation(chosen: list, rejected: list) -> tuple[list, str, str]:
    """(shared prompt messages, chosen completion, rejected completion) of two whole conversations."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise RowError("bad_messages", name, f"the last message of {name!r} must be the assistant's completion")
        if len(conv) < 2:
            raise RowError("bad_messages", name, f"{name!r} has no prompt before its completion")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("prompt_mismatch", "chosen/rejected", "chosen and rejected differ before their last message")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text: str, field_name: str) -> list[dict[str, str]]:
    """Anthropic hh-rlhf text ('\\n\\nHuman: ...\\n\\nAssistant: ...') to chat messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise RowError("bad_hh", field_name, f"field {field_name!r} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError("bad_hh", field_name, f"field {field_name!r} has text before its first '\\n\\nHuman:' turn")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    for i, m in enumerate(messages[:-1]):
        if not m["content"]:
            raise RowError("empty_text", field_name, f"field {field_name!r} turn {i} is empty")
    return messages


def normalise_row(row: dict[str, Any], fmt: str, where: str) -> Example:
    """One raw row to an Example (raises RowError)."""
    for name in REQUIRED_COLUMNS[fmt]:
        if name not in row:
            raise RowError("missing_field", name, f"field {name!r} is missing")
    if fmt == "ultrafeedback":
        prompt, chosen, rejected = _split_conversation(
            _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
        )
    elif fmt == "hh":
        c = parse_hh(_text(row["chosen"], "chosen"), "chosen")
        r = parse_hh(_text(row["rejected"], "rejected"), "rejected")
        prompt, chosen, rejected = _split_conversation(c, r)
    else:
        p = row["prompt"]
        prompt = (
            [{"role": "user", "content": _text(p, "prompt")}]
            if isinstance(p, str) or p is None
            else _messages(p, "prompt")
        )
        completions = []
        for name in ("chosen", "rejected"):
            value = row[name]
            if isinstance(value, list):
                conv = _messages(value, name)
                if conv[-1]["role"] != "assistant":
                    raise RowError(
                        "bad_messages", name, f"the last message of {name!r} must be the assistant's completion"
                    )
                if len(conv) > 1 and conv[:-1] != prompt:
                    raise RowError(
                        "prompt_mismatch", name, f"{name!r} conversation does not start with the row's prompt"
                    )
                completions.append(conv[-1]["content"])
            else:
                completions.append(_text(value, name, allow_empty=True))
        chosen, rejected = completions
    return Example(prompt, chosen, rejected, _score(row, "score_chosen"), _score(row, "score_rejected"), where)


def normalise(raw: RawRows, fmt: str, on_bad_row: str) -> tuple[list[Example], Counter]:
    """All rows to Examples. Structural faults (missing fields, wrong types, malformed turns) raise DataError, or
    are counted with on_bad_row: drop; data-quality drops (an empty or whitespace-only completion, identical
    completions, prompts that differ between chosen and rejected) are always counted, never fatal."""
    if not raw.rows:
        raise DataError(f"{raw.source}: the dataset has no rows")
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in raw.columns]
    if missing:
        raise DataError(
            f"{raw.source}: missing column(s) {missing} for format {fmt!r} (found {sorted(raw.columns)}); "
            f"{fmt} needs {list(REQUIRED_COLUMNS[fmt])}"
        )
    examples, dropped = [], Counter(raw.dropped)
    for row, label in zip(raw.rows, raw.labels):
        try:
            ex = normalise_row(row, fmt, f"{raw.source} {label}")
        except RowError as err:
            if err.kind == "prompt_mismatch":
                dropped["prompt_mismatch"] += 1
                continue
            if on_bad_row == "drop":
                dropped[f"bad_row:{err.kind}"] += 1
                continue
            raise DataError(
                f"{raw.source} {label}, field {err.field_name!r}: {err} (fix the row, or set on_bad_row: drop)"
            ) from None
        if not ex.chosen.strip() or not ex.rejected.strip():  # e.g. hh-rlhf's empty last assistant turns
            dropped["empty_response"] += 1
            continue
        if ex.chosen.strip() == ex.rejected.strip():
            dropped["identical_responses"] += 1
            continue
        examples.append(ex)
    return examples, dropped
