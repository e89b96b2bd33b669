"""The file and batch utilities every stage shares: one JSONL reader and writer, one atomic write, one padder.

One error rule for JSONL: a line that is not UTF-8, not JSON or not a JSON object raises :class:`JSONLError` naming
the file and the line number. The only exception is an append-only log (metrics.jsonl, samples.jsonl), whose last
line may be cut short by a killed process: readers of such logs pass ``torn_tail_ok=True`` and that one line (the
last, without its newline) is ignored.

Every write of a whole file goes through a temporary file in the same folder and a rename, so a reader never sees
half a file, and the file gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s owner-only ``0600``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import torch


class JSONLError(ValueError):
    """A bad line in a JSONL file; ``kind`` is ``not_utf8``, ``malformed_json`` or ``not_an_object``."""

    def __init__(self, path: Path, line_no: int, kind: str, detail: str):
        super().__init__(f"{path} line {line_no}: {detail}")
        self.path, self.line_no, self.kind, self.detail = path, line_no, kind, detail


def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml), falling back to the working directory."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, *here.parents):
        if (candidate / "pyproject.toml").exists():
            return candidate
    return Path.cwd()


def local_path(text: str) -> Path:
    """A user-given path as is (``~`` expanded), or relative to the repo root when only that exists (a notebook
    runs in notebooks/, the pipeline wherever the user started it)."""
    path = Path(text).expanduser()
    if not path.exists() and not path.is_absolute() and (repo_root() / path).exists():
        return repo_root() / path
    return path


def _parse_line(raw: bytes, path: Path, line_no: int) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise JSONLError(
            path,
            line_no,
            "not_utf8",
            f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); re-save the file as UTF-8",
        ) from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONLError(path, line_no, "malformed_json", f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise JSONLError(path, line_no, "not_an_object", f"expected a JSON object, got {type(row).__name__}")
    return row


def iter_jsonl(
    path: str | Path, on_bad_line: Callable[[JSONLError], None] | None = None, torn_tail_ok: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a JSONL file.

    A bad line raises :class:`JSONLError`, unless ``on_bad_line`` is given: it is called with the error and the line
    is skipped. ``torn_tail_ok``: a bad last line without a trailing newline is a write cut short and is ignored.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = _parse_line(raw, path, line_no)
            except JSONLError as err:
                if torn_tail_ok and not raw.endswith(b"\n"):  # only the last line can lack its newline
                    return
                if on_bad_line is None:
                    raise
                on_bad_line(err)
                continue
            yield line_no, row


def read_jsonl(path: str | Path, missing_ok: bool = False, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file (see :func:`iter_jsonl`); ``missing_ok``: a missing file has no rows."""
    if missing_ok and not Path(path).exists():
        return []
    return [row for _, row in iter_jsonl(path, torn_tail_ok=torn_tail_ok)]


def jsonl_line(row: Mapping[str, Any]) -> str:
    """One JSONL line (UTF-8 text kept as is, newline included)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a whole JSONL file atomically."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(jsonl_line(row))


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to a JSONL log, flushed and synced, so a killed process loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(jsonl_line(row))
        f.flush()
        os.fsync(f.fileno())


def default_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the umask (read from /proc on Linux; elsewhere set
    and restored, which is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file object on a temporary sibling of ``path`` that replaces ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Indented JSON (values JSON cannot hold are written with ``str``), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, L) long tensors, of token lists padded with ``pad_id`` to the longest on ``side``.

    Left padding for prompts that generation extends on the right; right padding for whole sequences scored by a
    model that reads the last real token. An empty list is an all-padding row.
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if len(seq):
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, cols] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))
