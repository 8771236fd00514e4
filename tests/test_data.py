"""The built-in corpus loads deterministically; splits and partitions are what they claim."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data.partition import partition_indices, partition_sizes


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


def test_partition_sizes_meet_the_minimum_by_construction() -> None:
    for sigma in (0.0, 0.5, 2.0):
        sizes = partition_sizes(1781, 50, 5, sigma, seed=42)
        assert len(sizes) == 50 and sum(sizes) == 1781 and min(sizes) >= 5
        assert sizes == partition_sizes(1781, 50, 5, sigma, seed=42)
    assert max(partition_sizes(1781, 50, 5, 0.0, seed=1)) - min(partition_sizes(1781, 50, 5, 0.0, seed=1)) <= 1
    spread = partition_sizes(1781, 50, 5, 1.0, seed=42)
    assert max(spread) > 4 * min(spread)  # log-normal sizes: some clients hold many times others' data
    with pytest.raises(ds.DataError, match="50 clients x 40 = 2000 examples"):
        partition_sizes(1781, 50, 40, 1.0, seed=42)


def test_inner_dirichlet_at_alpha_0_1_with_50_clients_never_fails(bbc: ds.Corpus) -> None:
    # The setting that made `dirichlet` give up after 10 draws: 50 clients, alpha 0.1, at least 5 each
    train, _ = ds.stratified_split(bbc.labels, 0.2, seed=42)
    labels = [bbc.labels[i] for i in train]
    with pytest.raises(ds.DataError, match="no Dirichlet draw"):
        partition_indices(labels, 50, kind="dirichlet", alpha=0.1, seed=42, min_partition_size=5)
    parts = partition_indices(labels, 50, kind="inner_dirichlet", alpha=0.1, seed=42, min_partition_size=5,
                              size_sigma=1.0)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))  # disjoint, covers the pool
    assert [len(p) for p in parts] == partition_sizes(len(labels), 50, 5, 1.0, seed=42)
    assert parts == partition_indices(labels, 50, kind="inner_dirichlet", alpha=0.1, seed=42,
                                      min_partition_size=5, size_sigma=1.0)
    shares = sorted(max(Counter(labels[i] for i in p).values()) / len(p) for p in parts)
    # strong skew: the median client's largest topic is over 70% of its data (0.79 here; 5 topics, so
    # an IID client's would be about 0.25)
    assert shares[len(shares) // 2] > 0.7


def test_iid_partition_sizes_are_even() -> None:
    parts = partition_indices([0, 1] * 50, 4, kind="iid")
    assert sorted(len(p) for p in parts) == [25, 25, 25, 25]


def _partitioner_parts(labels: list[int], n: int, partitioner: object) -> list[list[int]]:
    """What flwr-datasets' ``load_partition`` gives for every client (the way partitions were built before)."""
    import warnings

    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({"label": labels, "pos": list(range(len(labels)))})  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [sorted(partitioner.load_partition(pid)["pos"]) for pid in range(n)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("size", "n"), [(100, 4), (1781, 10), (1781, 1000), (1781, 1781), (7, 3), (1001, 7)])
def test_iid_partitions_equal_the_iid_partitioners(size: int, n: int) -> None:
    from flwr_datasets.partitioner import IidPartitioner

    labels = [(7 * i) % 5 for i in range(size)]
    assert partition_indices(labels, n, kind="iid") == _partitioner_parts(labels, n, IidPartitioner(num_partitions=n))


@pytest.mark.parametrize(("n", "alpha", "min_size"), [(10, 0.5, 10), (3, 0.5, 5), (50, 1.0, 5)])
def test_dirichlet_partitions_equal_loading_each_partition(bbc: ds.Corpus, n: int, alpha: float, min_size: int) -> None:
    from flwr_datasets.partitioner import DirichletPartitioner

    train, _ = ds.stratified_split(bbc.labels, 0.2, seed=42)
    labels = [bbc.labels[i] for i in train]
    slow = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha, seed=42,
                                min_partition_size=min_size, self_balancing=False, shuffle=True)
    assert partition_indices(labels, n, kind="dirichlet", alpha=alpha, seed=42, min_partition_size=min_size) == \
        _partitioner_parts(labels, n, slow)


def test_ten_thousand_iid_partitions_cover_every_example_once() -> None:
    # (their time is bench/clients.py's: 10.6 s when every partition was a Dataset.shard, 2026-12-02)
    labels = [i % 5 for i in range(32000)]
    parts = partition_indices(labels, 10000, kind="iid")
    assert sorted(i for p in parts for i in p) == list(range(32000))
    assert {len(p) for p in parts} == {3, 4}


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


def test_a_validation_split_is_held_out_of_training_and_leaves_the_test_set_alone(bbc: ds.Corpus) -> None:
    from fedlora.runtime.data.settings import DataSettings
    from fedlora.runtime.training.workspace import split_and_partition

    groups = tuple(bbc.labels)
    plain = split_and_partition(groups, True, DataSettings(), 10)
    held = split_and_partition(groups, True, DataSettings(validation_fraction=0.1), 10)
    assert plain.validation == [] and held.test == plain.test  # the test set does not move
    assert sorted(held.train + held.validation) == plain.train
    trained = {i for part in held.partitions for i in part}
    assert trained == set(held.train) and not trained & set(held.validation)
    assert not set(held.test) & set(held.validation)
    assert len(held.validation) == pytest.approx(0.1 * len(plain.train), abs=5)
    by_class, share = Counter(groups[i] for i in held.validation), Counter(groups[i] for i in plain.train)
    assert all(abs(by_class[c] - 0.1 * share[c]) <= 1 for c in share)  # stratified: each class's tenth
    assert split_and_partition(groups, True, DataSettings(validation_fraction=0.1), 10).validation == held.validation
    with pytest.raises(ds.DataError, match="data.validation_fraction=0.0001 holds out no example"):
        split_and_partition(groups, True, DataSettings(validation_fraction=0.0001), 10)


def test_max_validation_examples_holds_out_fewer_stratified_and_gives_the_rest_back_to_training(
        bbc: ds.Corpus) -> None:
    from fedlora.runtime.data.settings import DataSettings
    from fedlora.runtime.training.workspace import split_and_partition

    groups = tuple(bbc.labels)
    full = split_and_partition(groups, True, DataSettings(validation_fraction=0.1), 10)
    capped = split_and_partition(groups, True, DataSettings(validation_fraction=0.1, max_validation_examples=50), 10)
    assert len(capped.validation) == 50 and set(capped.validation) < set(full.validation)  # a subset of the tenth
    assert capped.test == full.test and sorted(capped.train + capped.validation) == sorted(full.train + full.validation)
    assert set(full.validation) - set(capped.validation) <= set(capped.train)  # the others go to the clients
    trained = {i for part in capped.partitions for i in part}
    assert trained == set(capped.train) and not trained & set(capped.validation)
    by_class, tenth = Counter(groups[i] for i in capped.validation), Counter(groups[i] for i in full.validation)
    assert all(abs(by_class[c] - 50 * tenth[c] / len(full.validation)) <= 1 for c in tenth)  # still stratified
    above = split_and_partition(groups, True, DataSettings(validation_fraction=0.1, max_validation_examples=10_000), 10)
    assert above.validation == full.validation and above.train == full.train  # a cap above the tenth changes nothing


def test_a_validation_split_that_starves_the_clients_is_named_in_the_error(bbc: ds.Corpus) -> None:
    from fedlora.runtime.data.settings import DataSettings
    from fedlora.runtime.training.workspace import split_and_partition

    with pytest.raises(ds.DataError, match=r"min_partition_size=10.*data.validation_fraction=0.95 holds out \d+"):
        split_and_partition(tuple(bbc.labels), True, DataSettings(validation_fraction=0.95), 10)


def test_each_client_holds_out_its_own_examples_to_evaluate_on(bbc: ds.Corpus) -> None:
    from fedlora.runtime.data.settings import DataSettings
    from fedlora.runtime.training.workspace import split_and_partition

    groups = tuple(bbc.labels)
    plain = split_and_partition(groups, True, DataSettings(), 10)
    held = split_and_partition(groups, True, DataSettings(client_test_fraction=0.2), 10)
    assert plain.client_tests == [] and held.test == plain.test and held.validation == plain.validation
    assert len(held.client_tests) == 10
    for whole, train, test in zip(plain.partitions, held.partitions, held.client_tests, strict=True):
        assert sorted(train + test) == sorted(whole) and not set(train) & set(test)  # the same partition, cut in two
        assert len(test) == max(1, round(0.2 * len(whole)))
    assert held.train == sorted(i for part in held.partitions for i in part)  # nobody trains on a held-out example
    assert split_and_partition(groups, True, DataSettings(client_test_fraction=0.2), 10) == held  # seeded
    other = split_and_partition(groups, True, DataSettings(client_test_fraction=0.2, split_seed=7), 10)
    assert other.client_tests != held.client_tests


def test_a_client_too_small_to_hold_out_an_example_is_an_error_naming_it() -> None:
    from fedlora.runtime.training.workspace import hold_out_client_tests

    trains, tests = hold_out_client_tests([[5, 6], [7, 8, 9]], 0.01, 0)
    assert [len(t) for t in tests] == [1, 1] and [len(t) for t in trains] == [1, 2]  # at least one of each
    trains, tests = hold_out_client_tests([[5, 6]], 0.99, 0)
    assert len(trains[0]) == 1 and len(tests[0]) == 1
    with pytest.raises(ds.DataError, match=r"client_test_fraction=0.2: client 1 holds 1 example\(s\), and needs at "
                                           r"least 2 .*min_partition_size"):
        hold_out_client_tests([[1, 2, 3], [4]], 0.2, 0)


def test_rows_tokenized_on_demand_are_those_of_the_whole_corpus_at_once(bbc: ds.Corpus) -> None:
    import torch

    from fedlora.runtime.models import load_tokenizer
    from fedlora.runtime.training.local import Encoded, TokenizedOnDemand

    texts, labels = bbc.texts[:300], bbc.labels[:300]
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    enc = tokenizer(list(texts), truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    whole = Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
    calls: list[int] = []

    def counting(batch: list[str], **kwargs: object) -> dict:
        calls.append(len(batch))
        return tokenizer(batch, **kwargs)

    lazy = TokenizedOnDemand(texts, labels, counting, 64)
    assert len(lazy) == 300 and calls == []  # nothing is tokenized before a batch asks
    for idx in ([7, 3, 250], [3, 9, 9, 120], list(range(0, 300, 37)), [299]):
        got, want = lazy.batch(idx), whole.batch(idx)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), idx
    assert calls == [3, 2, 9, 1]  # each row once: 3 and 9 of the second batch were read already
    assert torch.equal(lazy.input_ids, whole.input_ids) and torch.equal(lazy.attention_mask, whole.attention_mask)
    assert calls[4:] == [300 - 15]  # the whole corpus: only the rows no batch had read
