"""The built-in corpus loads deterministically; splits and partitions are what they claim."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data.partition import partition_indices


@pytest.fixture(scope="module")
def bbc() -> ds.Corpus:
    return ds.load_bbc_news()


def test_bbc_has_every_article_with_sorted_labels(bbc: ds.Corpus) -> None:
    assert len(bbc.texts) == 2225
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    counts = Counter(bbc.labels)
    assert [counts[i] for i in range(5)] == [510, 386, 417, 511, 401]


def test_bbc_loads_identically_twice(bbc: ds.Corpus) -> None:
    again = ds.load_bbc_news()
    assert again.texts == bbc.texts and again.labels == bbc.labels


def test_stratified_split_is_disjoint_fixed_and_proportional(bbc: ds.Corpus) -> None:
    train, test = ds.stratified_split(bbc.labels, 0.2, seed=42)
    assert not set(train) & set(test) and len(train) + len(test) == 2225
    assert (train, test) == ds.stratified_split(bbc.labels, 0.2, seed=42)
    per_class = Counter(bbc.labels[i] for i in test)
    for label, total in Counter(bbc.labels).items():
        assert abs(per_class[label] - 0.2 * total) <= 1


def test_dirichlet_partition_covers_train_once_and_is_skewed(bbc: ds.Corpus) -> None:
    train, _ = ds.stratified_split(bbc.labels, 0.2, seed=42)
    labels = [bbc.labels[i] for i in train]
    parts = partition_indices(labels, 10, kind="dirichlet", alpha=0.5, seed=42)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(labels)))
    assert parts == partition_indices(labels, 10, kind="dirichlet", alpha=0.5, seed=42)
    # label skew: some client's majority class holds more than half its data
    shares = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts]
    assert max(shares) > 0.5


def test_iid_partition_sizes_are_even() -> None:
    parts = partition_indices([0, 1] * 50, 4, kind="iid")
    assert sorted(len(p) for p in parts) == [25, 25, 25, 25]


def test_local_csv_loads_string_labels(tmp_path) -> None:
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": ["good", "bad", "fine"], "stars": ["pos", "neg", "pos"]}).to_csv(path, index=False)
    corpus = ds.load_corpus(str(path), text_column="review", label_column="stars")
    assert corpus.label_names == ("neg", "pos") and corpus.labels == (1, 0, 1)


def test_local_file_without_the_columns_names_them(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"body": ["x"], "y": [0]}).to_json(path, orient="records", lines=True)
    with pytest.raises(ds.DataError, match=r"no column\(s\) \['text', 'label'\].*data.text_column"):
        ds.load_corpus(str(path))
