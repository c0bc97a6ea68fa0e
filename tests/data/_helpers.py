"""Helpers for the data tests: writers for every supported file type."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

import datasets

FILE_KINDS = ("jsonl", "json", "jsonl.gz", "parquet", "arrow", "disk")


def write_rows(rows: list[dict], folder: pathlib.Path, kind: str, name: str = "data") -> str:
    """Write rows as one of FILE_KINDS; returns the path to load."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("jsonl", "jsonl.gz"):
        path = folder / f"{name}.{kind}"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if kind == "jsonl.gz":
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)
    if kind == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return str(path)
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = folder / f"{name}.parquet"
        ds.to_parquet(str(path))
        return str(path)
    disk = folder / f"{name}_disk"
    ds.save_to_disk(str(disk))
    if kind == "disk":
        return str(disk)
    arrow = next(disk.glob("*.arrow"))
    path = folder / f"{name}.arrow"
    shutil.copy(arrow, path)
    return str(path)
