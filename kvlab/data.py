"""Evaluation text: WikiText-2 (embedded or from the data dir), PG-19 books, local files, HF datasets.

``--data-dir`` / ``KVLAB_DATA_DIR`` points at local copies (the layout of ``shared/data``).
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path

DATA_DIR_ENV = "KVLAB_DATA_DIR"
_EMBEDDED_WIKITEXT2 = Path(__file__).parent / "data" / "wikitext2_test.txt.xz"
HF_DATASETS = {"Salesforce/wikitext": ("wikitext-2-raw-v1", "test"), "pg19": (None, "test")}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def dataset_names(root: Path | None) -> list[str]:
    names = ["wikitext2", "pg19"]
    if root and (root / "pg19").is_dir():
        names += [f"pg19:{p.stem}" for p in sorted((root / "pg19").glob("*.txt"))]
    return names + list(HF_DATASETS)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read data file {path}: {e}") from None
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def load_text(name: str, root: str | os.PathLike | None = None) -> str:
    """The text of dataset ``name``: ``wikitext2``, ``pg19``, ``pg19:<book>``, a file path, or an HF dataset."""
    base = data_dir(root)
    if name == "wikitext2":
        if base and (base / "wikitext2_test.txt").exists():
            return _read(base / "wikitext2_test.txt")
        with lzma.open(_EMBEDDED_WIKITEXT2, "rt", encoding="utf-8") as f:
            return f.read()
    if name == "pg19" or name.startswith("pg19:"):
        if not base or not (base / "pg19").is_dir():
            raise ValueError(f"dataset {name!r} needs PG-19 books in <data-dir>/pg19/*.txt; set --data-dir or {DATA_DIR_ENV}")
        books = sorted((base / "pg19").glob("*.txt"))
        if name != "pg19":
            books = [b for b in books if b.stem == name.split(":", 1)[1]]
            if not books:
                raise ValueError(f"no book {name.split(':', 1)[1]!r} in {base / 'pg19'}; valid: {dataset_names(base)}")
        return "\n\n".join(_read(b) for b in books)
    if Path(name).is_file():
        return _read(Path(name))
    if name in HF_DATASETS:
        return _load_hf(name)
    raise ValueError(f"unknown dataset {name!r}: not a file; valid datasets: {', '.join(dataset_names(base))}")


def _load_hf(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} needs the `datasets` package and a reachable hub") from None
    config, split = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # hub unreachable, dataset renamed, ...
        raise ValueError(f"cannot load HF dataset {name!r}: {e}") from None
    return "\n".join(t for t in ds["text"] if t.strip())
