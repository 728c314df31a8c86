"""Loading labelled text: the bydate tree, CSV and JSONL, bad rows, splits and the token cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.text_encoding import TextPreprocessing
from training.image.data import DataError
from training.text import data as text_data
from training.text.data import cached_tokens, label_budget, load_text_data, stratified_split


def test_bydate_tree_loads_every_post_with_folder_names_as_classes(news_subset: Path) -> None:
    data = load_text_data(news_subset)
    assert data.classes == sorted(p.name for p in news_subset.iterdir())
    assert len(data) == 320 and data.labels.bincount().tolist() == [80, 80, 80, 80]
    assert all(text.strip() for text in data.texts)
    assert load_text_data(news_subset).fingerprint == data.fingerprint


def test_bydate_tree_with_an_empty_class_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1").write_text("hello")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="'b' holds no text files"):
        load_text_data(tmp_path)


def test_csv_and_jsonl_load_text_and_label_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "posts.csv"
    csv_path.write_text('label,text\nspace,"The shuttle, launched"\nhockey,Goalie saves\n', encoding="utf-8")
    data = load_text_data(csv_path)
    assert data.classes == ["hockey", "space"] and data.texts[0] == "The shuttle, launched"
    assert data.labels.tolist() == [1, 0]
    jsonl = tmp_path / "posts.jsonl"
    jsonl.write_text(json.dumps({"text": "Goalie saves", "label": 3}) + "\n\n" + json.dumps({"text": "x", "label": "7"}))
    assert load_text_data(jsonl).classes == ["3", "7"]


@pytest.mark.parametrize("content, message", [
    ("text,label\nhello,\n", r"posts.csv:2: missing or empty 'label'"),
    ("text,label\n,space\n", r"posts.csv:2: missing or empty 'text'"),
    ("body,label\nhello,space\n", "must name 'text' and 'label'"),
    ("text,label\nhello,space,extra\n", "more fields than the header"),
])
def test_csv_bad_rows_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "posts.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_text_data(path)


@pytest.mark.parametrize("line, message", [
    ('{"text": "hello"', "posts.jsonl:2: invalid JSON"),
    ('["hello", "space"]', "posts.jsonl:2: expected a JSON object"),
    ('{"text": "hello"}', "posts.jsonl:2: missing or empty 'label'"),
    ('{"text": 5, "label": "a"}', "posts.jsonl:2: missing or empty 'text'"),
])
def test_jsonl_bad_rows_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_text_data(path)


def test_labels_outside_the_given_classes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "odd", "label": "z"}\n')
    assert load_text_data(path, classes=["z", "b", "a"]).labels.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"labels \['z'\] are not among the classes"):
        load_text_data(path, classes=["a", "b"])


def test_unknown_file_types_and_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "posts.txt").write_text("hello")
    with pytest.raises(DataError, match="expected a folder per class"):
        load_text_data(tmp_path / "posts.txt")
    with pytest.raises(DataError, match="no such file"):
        load_text_data(tmp_path / "missing.csv")


def test_split_is_stratified_and_label_budget_keeps_every_class(news_subset: Path) -> None:
    data = load_text_data(news_subset)
    train, validation = stratified_split(data.labels, 0.1, 0)
    assert data.labels[validation].bincount().tolist() == [8, 8, 8, 8]
    assert set(train.tolist()).isdisjoint(validation.tolist())
    kept = label_budget(data.labels[train], 0.01, seed=1)
    assert data.labels[train][kept].bincount().tolist() == [1, 1, 1, 1]
    assert not label_budget(data.labels[train], 0.5, seed=1).equal(label_budget(data.labels[train], 0.5, seed=2))


def test_token_cache_means_a_second_run_does_not_tokenise(news_subset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_text_data(news_subset).subset(range(20))
    settings = TextPreprocessing(max_tokens=64)
    first = cached_tokens(data, settings, cache_dir=tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenised again")

    monkeypatch.setattr(text_data, "tokenize", refuse)
    assert cached_tokens(data, settings, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="tokenised again"):  # other settings: another cache entry
        cached_tokens(data, TextPreprocessing(max_tokens=32), cache_dir=tmp_path)
