"""Reading local dataset files with `datasets` (offline): JSON(L) (optionally gzipped), Parquet, Arrow,
and `save_to_disk` folders. Errors name the path (and, for broken JSON lines, the row)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import datasets

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_ARROW_SUFFIXES = (".arrow",)


class DataFileError(ValueError):
    """A dataset file is missing, unsupported, or unreadable (the message names the path)."""


def resolve_path(path: str) -> pathlib.Path:
    """Expand `~` and `$VARS`; raise `DataFileError` naming the path when nothing is there."""
    if not path:
        raise DataFileError("data.path is empty: set it to a local .jsonl/.json/.parquet/.arrow file or folder")
    expanded = os.path.expandvars(os.path.expanduser(path))
    if "$" in expanded:
        raise DataFileError(f"{path}: an environment variable in the path is not set")
    resolved = pathlib.Path(expanded)
    if not resolved.exists():
        raise DataFileError(f"{path}: no such file or folder")
    return resolved


def file_kind(path: pathlib.Path) -> str:
    """"json" | "parquet" | "arrow" | "disk" (a save_to_disk folder), from the extension or folder contents."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "disk"
        raise DataFileError(f"{path}: a folder, but not one written by Dataset.save_to_disk")
    name = path.name.lower()
    for kind, suffixes in (("json", _JSON_SUFFIXES), ("parquet", _PARQUET_SUFFIXES), ("arrow", _ARROW_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    raise DataFileError(
        f"{path}: unsupported file type; expected one of {_JSON_SUFFIXES + _PARQUET_SUFFIXES + _ARROW_SUFFIXES}"
        " or a save_to_disk folder"
    )


def load_rows(path: str, *, split: str | None = None) -> datasets.Dataset:
    """Load one local dataset as a `datasets.Dataset` (memory-mapped Arrow; nothing is downloaded).

    Args:
      path: File or `save_to_disk` folder (see `DataConfig.path`).
      split: For folders holding a `DatasetDict`: which split (default "train", or the only one).

    Raises:
      DataFileError: naming the path for a missing/unsupported file, or the path and row for bad JSON.
    """
    resolved = resolve_path(path)
    kind = file_kind(resolved)
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(str(resolved))
        else:
            loaded = datasets.load_dataset(kind, data_files=str(resolved), split="train")
    except Exception as e:  # noqa: BLE001 -- re-raised with the path (and row) in the message
        detail = _json_problem(resolved) if kind == "json" else None
        raise DataFileError(f"{path}: cannot read as {kind}: {detail or e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            split = "train" if "train" in loaded else (names[0] if len(names) == 1 else None)
        if split not in loaded:
            raise DataFileError(f"{path}: split {split!r} not found; splits are {names}")
        loaded = loaded[split]
    return loaded


def _json_problem(path: pathlib.Path) -> str | None:
    """Find the first unparsable line/document of a JSON(L) file, for an error message."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return None  # one JSON document: the problem is elsewhere
    except json.JSONDecodeError:
        pass
    row = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"row {row} (line {line_no}): invalid JSON: {e.msg}"
        if not isinstance(value, dict):
            return f"row {row} (line {line_no}): expected a JSON object, got {type(value).__name__}"
        row += 1
    return None
