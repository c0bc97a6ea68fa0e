"""Helpers for the data tests: a ChatML tokenizer builder and writers for every supported file type."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil
import sysconfig

import datasets

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FILE_KINDS = ("jsonl", "json", "jsonl.gz", "parquet", "arrow", "disk")


def build_tokenizer(out_dir: pathlib.Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(stdlib / n) for n in ("textwrap.py", "string.py", "difflib.py", "argparse.py")], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return hf


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
