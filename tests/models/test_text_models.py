"""The text architectures: the fixed BiLSTM and the in-model TF-IDF n-gram bag."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models import build_model
from models.text_encoding import pad_batch
from models.text_models import NgramBagClassifier
from training.text.ngram import NgramOptions, build_ngram_model, char_ngrams, feature_matrix


def test_bilstm_ignores_padding_thanks_to_packed_sequences() -> None:
    torch.manual_seed(0)
    model = build_model("bilstm", {"vocab_size": 50, "num_classes": 3, "embedding_dim": 8, "hidden_size": 6}).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    padded_more = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids), model(padded_more), atol=1e-6)
        alone = model(ids[:1, :3])
    assert torch.allclose(model(ids)[0], alone[0], atol=1e-6)
    assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 3)  # an empty post still gets logits


def test_char_ngrams_match_scikit_learn_char_wb() -> None:
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(analyzer="char_wb", ngram_range=(2, 5), lowercase=False)
    for word in ("orbit", "a", "nasa.gov"):
        assert sorted(char_ngrams(word, 2, 5)) == sorted(vectorizer.build_analyzer()(word))


def test_ngram_bag_features_equal_scikit_learn_tfidf_on_the_same_tokens() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    posts = [[2, 3, 3, 4], [3, 5, 5, 5, 6], [2, 6], [4, 4, 7, 2, 3]]
    itos = ["<pad>", "<unk>", "a", "b", "c", "d", "e", "f"]
    model = build_ngram_model(posts, itos, 2, NgramOptions(bigram_min_df=1, max_char_ngrams=0), max_tokens=16)
    ours = feature_matrix(model, posts).toarray()
    vectorizer = TfidfVectorizer(analyzer=lambda ids: list(map(str, ids)) + [f"{a} {b}" for a, b in itertools.pairwise(ids)],
                                 sublinear_tf=True)
    theirs = vectorizer.fit_transform(posts).toarray()
    names = list(vectorizer.get_feature_names_out())
    keys = model.bigram_keys.tolist()
    columns = [names.index(str(i)) for i in range(2, 8)]
    columns += [names.index(f"{k // 8} {k % 8}") for k in keys]
    np.testing.assert_allclose(ours[:, [*range(2, 8), *range(8, 8 + len(keys))]], theirs[:, columns], rtol=1e-5)


def test_ngram_bag_logits_are_the_linear_layer_over_features_and_ignore_padding() -> None:
    posts = [[2, 3, 4], [4, 5]]
    model = build_ngram_model(posts, ["<pad>", "<unk>", "a", "b", "c", "d"], 3, NgramOptions(bigram_min_df=1, char_min_df=1),
                              max_tokens=8)
    assert isinstance(model, NgramBagClassifier)
    torch.nn.init.normal_(model.weight)
    dense = torch.from_numpy(feature_matrix(model, posts).toarray()).float()
    logits = model(pad_batch(posts, 8))
    torch.testing.assert_close(logits, dense @ model.weight + model.bias)
    torch.testing.assert_close(model(torch.cat([pad_batch(posts, 8), torch.zeros(2, 4, dtype=torch.long)], 1)), logits)
    assert model(torch.zeros(2, 1, dtype=torch.long)).abs().sum() == 0  # empty posts: bias only (zero here)


@pytest.mark.parametrize("name", ["bilstm", "ngram_bag"])
def test_text_models_build_from_plain_dict_configs(name: str) -> None:
    model = build_model(name, {"vocab_size": 10, "num_classes": 4})
    assert model(torch.tensor([[2, 3, 0]])).shape == (1, 4)


def test_ngram_bag_float16_weights_give_the_same_predictions_in_half_the_bytes() -> None:
    posts = [[2, 3, 4, 2], [4, 5, 3], [5, 5, 2]]
    itos = ["<pad>", "<unk>", "a", "b", "c", "d"]
    full = build_ngram_model(posts, itos, 3, NgramOptions(bigram_min_df=1, char_min_df=1), max_tokens=8)
    half = build_ngram_model(posts, itos, 3, NgramOptions(bigram_min_df=1, char_min_df=1, weight_dtype="float16"),
                             max_tokens=8)
    torch.nn.init.normal_(full.weight)
    with torch.no_grad():
        half.weight.copy_(full.weight.half())
    assert half.weight.dtype == torch.float16 and half.weight.element_size() * 2 == full.weight.element_size()
    torch.testing.assert_close(half(pad_batch(posts, 8)), full(pad_batch(posts, 8)), atol=2e-3, rtol=1e-3)
