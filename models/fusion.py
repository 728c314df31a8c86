"""Image + text fusion classifiers and the input contract the service prepares for them.

Two registered architectures, both called the same way (``FUSION_INPUTS``)::

    logits = model(images, token_ids, image_mask, text_mask)  # (B, classes)

* ``fusion_late`` — late fusion. Image side: a ``fastconv`` encoder (the CIFAR-10 network without
  its head: whitening stem, conv groups, global max pool → (B, width)) and a linear scorer on its
  standardised features → (B, classes). Text side: an n-gram bag over the fusion vocabulary (TF-IDF
  features of words, bigrams and character n-grams → (B, classes)) plus, when transferred, the
  frozen n-gram model of the text checkpoint (``topic``: its log-probabilities over the 20
  newsgroups) and, with ``lexicon``, five sentiment-lexicon features (``lexicon_features``: per-token
  valences summed with VADER's negation rule) and, with ``sentence``, a linear scorer on the frozen
  embedding of a pretrained sentence encoder (``models.sentence_encoder``: MiniLM, WordPiece ids of
  its own). A learned fusion head reads both score vectors and the presence masks (a linear path
  plus a small MLP). A missing side contributes zeros and its mask bit tells the head.
* ``fusion_joint`` — joint fusion through the shared trunk: the ``trunk`` architecture with both
  adapters, image patch tokens and text tokens in one sequence after the class token. A missing
  side is masked out of attention (its tokens are padding), so the class token reads only what is
  present.

Every table the forward pass needs is a buffer, so a checkpoint rebuilds the model from its
manifest alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.image_cnn import FastConvConfig, FastConvNet
from models.preprocessing import ImagePreprocessing, ImagePreprocessingError
from models.registry import register_model
from models.sentence_encoder import SENTENCE_VOCAB_FILE, SentenceEncoder, SentenceEncoderConfig, WordPieceTokenizer
from models.text_encoding import PAD_ID, UNK_ID, TextEncoder, TextEncodingError, TextPreprocessing, Vocabulary
from models.text_models import NgramBagClassifier, NgramBagConfig
from models.trunk import TrunkClassifier, TrunkConfig

if TYPE_CHECKING:
    from models.checkpoint import Manifest

FUSION_INPUTS = """\
A multimodal checkpoint (task "multimodal") is called as

    logits = model(images=..., token_ids=..., image_mask=..., text_mask=...)  # (B, classes)

for B pairs, item i being image i with text i, either of which may be absent:

* images     float32 (B, 3, S, S): each present image decoded, converted to RGB, resized to S×S
             (bilinear, no aspect preservation: the image runner's rule), then standardised per
             channel as (pixel - 255·mean) / (255·std) with mean/std from
             manifest.preprocessing["image"] (0–1 scale, as for image checkpoints; read as
             ``models.preprocessing.ImagePreprocessing``, whose ``normalize`` does this). Zeros for an
             absent image.
* token_ids  int64 (B, T), T ≥ 1: each present text encoded with the checkpoint's own encoder
             (``load_fusion_text_encoder``: manifest.preprocessing["text"] and its vocabulary file,
             usually vocab.json), right-padded with 0. A row of 0s for an absent text.
* image_mask bool (B,): True where item i has an image.
* text_mask  bool (B,): True where item i has a text. At least one of the two must be True for
             every item (a pair with neither is a client error).
* sentence_ids int64 (B, L), only for a model with a sentence encoder (manifest.preprocessing has a
             "sentence" entry): each present text's WordPiece ids (``load_fusion_sentence_tokenizer``:
             [CLS] … [SEP]), right-padded with 0; a row of 0s for an absent text.

``collate_fusion_batch`` builds exactly these tensors from per-item uint8 images and 1-D token ids.
The logits are divided by manifest.calibration["temperature"] before the softmax, as for every task.
"""


class FusionInputError(ValueError):
    """Fusion inputs that do not match the contract in ``FUSION_INPUTS``."""


def _masks(
    batch: int, device: torch.device, images: torch.Tensor | None, token_ids: torch.Tensor | None,
    image_mask: torch.Tensor | None, text_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Presence masks (B,) bool: given ones, else True for a given modality and False for a missing one."""
    if image_mask is None:
        image_mask = torch.full((batch,), images is not None, dtype=torch.bool, device=device)
    if text_mask is None:
        text_mask = torch.full((batch,), token_ids is not None, dtype=torch.bool, device=device)
    return image_mask.to(device=device, dtype=torch.bool), text_mask.to(device=device, dtype=torch.bool)


def first_pair_without_a_side(has_image: Sequence[bool], has_text: Sequence[bool]) -> int | None:
    """The index of the first pair with neither an image nor a text, or None: every pair needs a side."""
    return next((index for index, (image, text) in enumerate(zip(has_image, has_text, strict=True))
                 if not image and not text), None)


def _batch_of(images: torch.Tensor | None, token_ids: torch.Tensor | None) -> tuple[int, torch.device]:
    if images is not None:
        return images.shape[0], images.device
    if token_ids is not None:
        return token_ids.shape[0], token_ids.device
    raise FusionInputError("need images or token_ids (or both)")


# ---- late fusion --------------------------------------------------------------------------------

@dataclasses.dataclass
class LateFusionConfig:
    num_classes: int = 3
    # FastConvConfig fields of the image encoder (num_classes is ignored: the head is dropped)
    image: dict[str, Any] = dataclasses.field(default_factory=dict)
    # NgramBagConfig fields of the text n-gram bag over the fusion vocabulary (num_classes outputs)
    text: dict[str, Any] = dataclasses.field(default_factory=lambda: {"vocab_size": 2, "num_classes": 3})
    # NgramBagConfig of the transferred (frozen) text checkpoint's n-gram model; {} for none. Token
    # ids at or above its vocab_size (tokens the fusion vocabulary added) are read as <unk> by it.
    topic: dict[str, Any] = dataclasses.field(default_factory=dict)
    hidden: int = 32
    dropout: float = 0.1
    # Sentiment-lexicon features of the text (``lexicon_features``) for the head; the per-token
    # valence and negator tables are buffers filled by training.
    lexicon: bool = False
    # SentenceEncoderConfig fields of a frozen pretrained sentence encoder whose embedding gets a
    # linear scorer (num_classes outputs) on the text side; {} for none
    sentence: dict[str, Any] = dataclasses.field(default_factory=dict)


LEXICON_FEATURES = 5
NEGATION_SCOPE = 3  # a negator flips the valence of the next three tokens …
NEGATION_FACTOR = -0.74  # … scaled as VADER (Hutto & Gilbert, 2014) does


class LateFusionClassifier(nn.Module):
    """Per-modality scores (image: fastconv features → linear; text: n-gram bag ⊕ topic) → fusion head.

    Each side first gives a distribution-like score vector, ``image_scores`` (B, classes) and
    ``text_scores`` (B, classes [+ topics]); the head reads them with the presence masks, through a
    linear path plus a small MLP (interactions, e.g. how far to trust the image when the text is
    unsure). Low-dimensional inputs keep the head from memorising either side.
    """

    def __init__(self, config: LateFusionConfig) -> None:
        super().__init__()
        self.config = config
        image_config = FastConvConfig(**{**config.image, "num_classes": 1, "tta_flip": False})
        self.image_encoder = FastConvNet(image_config)
        self.image_encoder.head = nn.Identity()  # type: ignore[assignment]  # features only
        width = image_config.widths[-1]
        # features are standardised with training statistics before the linear scorer
        self.register_buffer("image_mean", torch.zeros(width))
        self.register_buffer("image_std", torch.ones(width))
        self.image_mean: torch.Tensor
        self.image_std: torch.Tensor
        self.image_scorer = nn.Linear(width, config.num_classes)
        self.text_bag = NgramBagClassifier(NgramBagConfig(**config.text))
        if config.lexicon:
            vocab_size = self.text_bag.config.vocab_size
            self.register_buffer("valence", torch.zeros(vocab_size))  # per token id; 0: neutral or unknown
            self.register_buffer("negator", torch.zeros(vocab_size, dtype=torch.bool))
        self.valence: torch.Tensor
        self.negator: torch.Tensor
        self.topic = NgramBagClassifier(NgramBagConfig(**config.topic)) if config.topic else None
        if self.topic is not None:
            self.topic.requires_grad_(False)
        self.sentence_encoder: SentenceEncoder | None = None
        if config.sentence:
            self.sentence_encoder = SentenceEncoder(SentenceEncoderConfig(**config.sentence))
            self.sentence_encoder.requires_grad_(False)
            self.sentence_scorer = nn.Linear(self.sentence_encoder.config.hidden, config.num_classes)
        fused = config.num_classes + self.text_width + 2
        self.linear = nn.Linear(fused, config.num_classes)
        self.mlp = nn.Sequential(nn.Linear(fused, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, config.num_classes))

    @property
    def text_width(self) -> int:
        topics = self.topic.config.num_classes if self.topic is not None else 0
        sentence = self.config.num_classes if self.sentence_encoder is not None else 0
        return self.text_bag.config.num_classes + sentence + topics + (LEXICON_FEATURES if self.config.lexicon else 0)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) standardised images → (B, width) max-pooled fastconv features (any S ≥ 16)."""
        encoder = self.image_encoder
        x = encoder.act(encoder.whiten(images))
        x = encoder.groups(x)  # (B, width, h, w)
        return torch.amax(x, dim=(2, 3))  # (B, width)

    def image_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_scorer((features - self.image_mean) / self.image_std)  # (B, classes)

    def text_scores(self, token_ids: torch.Tensor, sentence_ids: torch.Tensor | None = None,
                    sentence_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids [, (B, L) WordPiece ids] → (B, text_width): bag scores, sentence scores, the
        topic model's log-probabilities, lexicon features. Training passes the frozen encoder's
        ``sentence_embeddings`` (B, hidden) it already computed instead of ``sentence_ids``."""
        scores = [self.text_bag(token_ids)]  # (B, classes)
        if self.sentence_encoder is not None:
            if sentence_embeddings is None:
                if sentence_ids is None:
                    raise FusionInputError("this model has a sentence encoder: pass sentence_ids (see FUSION_INPUTS)")
                sentence_embeddings = self.sentence_encoder(sentence_ids)
            scores.append(self.sentence_scorer(sentence_embeddings))  # (B, classes)
        if self.topic is not None:
            known = torch.where(token_ids < self.topic.config.vocab_size, token_ids, torch.full_like(token_ids, UNK_ID))
            known = torch.where(token_ids == PAD_ID, token_ids, known)
            scores.append(self.topic(known).log_softmax(dim=1))  # (B, topics)
        if self.config.lexicon:
            scores.append(self.lexicon_features(token_ids))  # (B, LEXICON_FEATURES)
        return torch.cat(scores, dim=1)

    def lexicon_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, 5): the VADER-style compound score of the summed valence (negated
        within three tokens after a negator), then log1p of the positive and negative valence mass
        and of the counts of positive and negative tokens."""
        valence = self.valence[token_ids]  # (B, T); padding has id 0, whose valence is 0
        negator = self.negator[token_ids]  # (B, T)
        negated = torch.zeros_like(negator)
        for shift in range(1, NEGATION_SCOPE + 1):
            negated[:, shift:] |= negator[:, :-shift]
        valence = torch.where(negated, valence * NEGATION_FACTOR, valence)
        total = valence.sum(dim=1)  # (B,)
        return torch.stack([
            total / torch.sqrt(total * total + 15.0),  # VADER's normalisation to (−1, 1)
            valence.clamp(min=0).sum(dim=1).log1p(), (-valence).clamp(min=0).sum(dim=1).log1p(),
            (valence > 0).sum(dim=1).float().log1p(), (valence < 0).sum(dim=1).float().log1p(),
        ], dim=1)

    def fuse(self, image_scores: torch.Tensor, text_scores: torch.Tensor,
             image_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, classes), (B, text_width), masks (B,) → (B, classes); absent sides contribute zeros."""
        image_on = image_mask.to(image_scores.dtype).unsqueeze(1)  # (B, 1)
        text_on = text_mask.to(text_scores.dtype).unsqueeze(1)
        fused = torch.cat([image_scores * image_on, text_scores * text_on, image_on, text_on], dim=1)  # (B, F)
        return self.linear(fused) + self.mlp(fused)

    def forward(self, images: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                sentence_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch, device = _batch_of(images, token_ids)
        image_mask, text_mask = _masks(batch, device, images, token_ids, image_mask, text_mask)
        if images is None or not bool(image_mask.any()):
            image_scores = torch.zeros(batch, self.config.num_classes, device=device)
        else:
            image_scores = self.image_scores(self.image_features(images))
        if token_ids is None:
            token_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        if self.sentence_encoder is not None and sentence_ids is None and not bool(text_mask.any()):
            sentence_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # no text anywhere
        return self.fuse(image_scores, self.text_scores(token_ids, sentence_ids), image_mask, text_mask)  # (B, classes)


@register_model("fusion_late", LateFusionConfig)
def build_fusion_late(config: LateFusionConfig) -> nn.Module:
    return LateFusionClassifier(config)


# ---- joint fusion through the shared trunk --------------------------------------------------------

@dataclasses.dataclass
class JointFusionConfig(TrunkConfig):
    num_classes: int = 3
    modalities: tuple[str, ...] = ("image", "text")
    max_text_tokens: int = 64


class JointFusionClassifier(TrunkClassifier):
    """The trunk with both adapters; absent modalities are padding in the one token sequence."""

    def __init__(self, config: JointFusionConfig) -> None:
        if set(config.modalities) != {"image", "text"}:
            raise ValueError("joint fusion needs modalities ('image', 'text')")
        super().__init__(config)

    def forward(self, images: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,  # type: ignore[override]
                image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, device = _batch_of(images, token_ids)
        image_mask, text_mask = _masks(batch, device, images, token_ids, image_mask, text_mask)
        parts = []
        if images is not None and bool(image_mask.any()):
            tokens, padding = self.adapters["image"](images)  # (B, N, dim), (B, N)
            parts.append(("image", tokens, padding | ~image_mask.unsqueeze(1)))
        if token_ids is not None and bool(text_mask.any()):
            tokens, padding = self.adapters["text"](token_ids)  # (B, T, dim), (B, T)
            parts.append(("text", tokens, padding | ~text_mask.unsqueeze(1)))
        if not parts:  # nothing present anywhere: the class token alone
            empty = torch.zeros(batch, 0, self.config.dim, device=device)
            parts.append(("image", empty, torch.zeros(batch, 0, dtype=torch.bool, device=device)))
        return self.head(self.trunk(parts))  # (B, classes)


@register_model("fusion_joint", JointFusionConfig)
def build_fusion_joint(config: JointFusionConfig) -> nn.Module:
    return JointFusionClassifier(config)


# ---- what the service prepares -----------------------------------------------------------------

def fusion_preprocessing(manifest: Manifest) -> tuple[ImagePreprocessing, dict[str, Any]]:
    """(image preprocessing, text preprocessing as its plain dict) of a multimodal manifest; a bad image
    entry is an ``ImagePreprocessingError``."""
    values = manifest.preprocessing
    image, text = values.get("image"), values.get("text")
    if values.get("kind") != "multimodal" or not isinstance(image, dict) or not isinstance(text, dict):
        raise FusionInputError("multimodal preprocessing must be {'kind': 'multimodal', 'image': {...}, 'text': {...}}")
    return ImagePreprocessing.from_dict(image), dict(text)


def load_fusion_text_encoder(checkpoint_dir: str | Path, manifest: Manifest) -> TextEncoder:
    """The text encoder of a multimodal checkpoint (its text preprocessing and verified vocabulary)."""
    from models.checkpoint import CheckpointError, read_extra_file

    try:
        _, text = fusion_preprocessing(manifest)
        preprocessing = TextPreprocessing.from_dict(text)
        vocabulary = Vocabulary.from_json_bytes(read_extra_file(checkpoint_dir, manifest, preprocessing.vocab_file))
    except (TextEncodingError, FusionInputError, ImagePreprocessingError) as error:
        raise CheckpointError(f"{checkpoint_dir}: {error}") from None
    return TextEncoder(preprocessing, vocabulary)


def load_fusion_sentence_tokenizer(checkpoint_dir: str | Path, manifest: Manifest) -> WordPieceTokenizer | None:
    """The WordPiece tokenizer of a multimodal checkpoint with a sentence encoder; ``None`` without one."""
    from models.checkpoint import CheckpointError, read_extra_file

    sentence = manifest.preprocessing.get("sentence")
    if sentence is None:
        return None
    try:
        if not isinstance(sentence, dict) or sentence.get("kind") != "wordpiece":
            raise ValueError("preprocessing['sentence'] must be {'kind': 'wordpiece', 'vocab_file': ..., 'max_tokens': ...}")
        payload = read_extra_file(checkpoint_dir, manifest, str(sentence.get("vocab_file", SENTENCE_VOCAB_FILE)))
        return WordPieceTokenizer.from_json_bytes(payload, int(sentence.get("max_tokens", 256)))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint_dir}: {error}") from None


def _pad_rows(rows: Sequence[torch.Tensor | None], batch: int) -> torch.Tensor:
    length = max([1, *(len(ids) for ids in rows if ids is not None)])
    padded = torch.zeros(batch, length, dtype=torch.long)  # (B, T), 0 = padding
    for row, ids in enumerate(rows):
        if ids is not None and len(ids):
            padded[row, : len(ids)] = ids
    return padded


def collate_fusion_batch(
    images: Sequence[torch.Tensor | None], token_ids: Sequence[torch.Tensor | None],
    preprocessing: ImagePreprocessing, device: torch.device | str = "cpu",
    sentence_ids: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-item uint8 (3, S, S) images and 1-D token ids (``None`` = absent), and for a model with a
    sentence encoder each item's WordPiece ids, → the model's keyword inputs, the images standardised
    as the checkpoint's image ``preprocessing`` says."""
    if len(images) != len(token_ids):
        raise FusionInputError(f"{len(images)} image slots but {len(token_ids)} text slots; pairs go by position")
    batch = len(images)
    if batch == 0:
        raise FusionInputError("no pairs")
    image_mask = torch.tensor([image is not None for image in images], dtype=torch.bool)
    text_mask = torch.tensor([ids is not None and len(ids) > 0 for ids in token_ids], dtype=torch.bool)
    missing = first_pair_without_a_side(image_mask.tolist(), text_mask.tolist())
    if missing is not None:
        raise FusionInputError(f"pair {missing} has neither an image nor a text")
    size = preprocessing.size
    pixels = torch.zeros(batch, 3, size, size, dtype=torch.uint8)  # (B, 3, S, S)
    for row, image in enumerate(images):
        if image is not None:
            if tuple(image.shape) != (3, size, size):
                raise FusionInputError(f"image {row} has shape {tuple(image.shape)}, expected (3, {size}, {size})")
            pixels[row] = image
    ids_batch = _pad_rows(token_ids, batch)
    device = torch.device(device)
    standardised = preprocessing.normalize(pixels.to(device)) * image_mask.to(device).view(-1, 1, 1, 1)
    inputs = {"images": standardised, "token_ids": ids_batch.to(device), "image_mask": image_mask.to(device),
              "text_mask": text_mask.to(device)}
    if sentence_ids is not None:
        if len(sentence_ids) != batch:
            raise FusionInputError(f"{len(sentence_ids)} sentence slots for {batch} pairs")
        kept = [ids if bool(on) else None for ids, on in zip(sentence_ids, text_mask, strict=True)]
        inputs["sentence_ids"] = _pad_rows(kept, batch).to(device)
    return inputs
