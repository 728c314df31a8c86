"""What differs between tasks, behind one small interface the registry and the worker share.

A ``TaskRunner`` owns one loaded checkpoint's steps around the model: ``prepare`` (untrusted
inputs → per-item payloads, CPU; the service awaits ``prepare_async``, which decodes images in a
thread pool and hands texts to the service's ``app.tokenizing.TokenizerPool``, whose worker
processes take the texts of the requests of one event-loop turn in one call), ``collate`` (payloads
→ a batch of device tensors), ``forward`` (the model call), ``calibrate`` (logits → the calibrated
distribution, with the checkpoint's fitted calibration map) and a warm-up payload. The worker is
generic over runners; each task has a runner here and one entry in ``RUNNERS``: images, texts, and
image + text pairs (``multimodal``, prepared as ``models.fusion.FUSION_INPUTS`` says).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from app.encoder_copies import copy_encoder_files
from app.errors import InvalidInput
from app.preprocess import prepare_images
from app.tokenizing import IN_THREAD, EncoderSource, TokenizerPool, load_encoder
from app.tracing import Forward, script_text_model, trace_image_model
from models.calibration import Calibration
from models.checkpoint import CheckpointError, LoadedCheckpoint

# importing models.fusion registers the fusion architectures (models/__init__ does not import it)
from models.fusion import (
    FusionInputError,
    collate_fusion_batch,
    first_pair_without_a_side,
    fusion_preprocessing,
    load_fusion_sentence_tokenizer,
)
from models.precision import native_autocast_dtype
from models.preprocessing import ImagePreprocessing, ImagePreprocessingError
from models.text_encoding import PAD_ID, UNK_ID

RunBlocking = Callable[..., Awaitable[Any]]  # run a function in the service's thread pool


def _encoder_source(checkpoint: LoadedCheckpoint, task: str, tokenizer: TokenizerPool, owner: object) -> EncoderSource:
    """Where the model's text encoder is read: with tokenizer processes, a private copy of its files as
    loaded now (``app.encoder_copies``, removed with ``owner``), since a process may read them much later."""
    copy_dir = ""
    if tokenizer.processes > 0:
        copy_dir = str(copy_encoder_files(checkpoint.directory, checkpoint.manifest, owner=owner))
    return EncoderSource(str(checkpoint.directory), task, copy_dir)


class TaskRunner(abc.ABC):
    task: ClassVar[str]
    # Autocast on a CPU with native bfloat16 too (not only on CUDA): worth it for convolution-bound
    # models; the text models are cheap and stay in float32 there.
    cpu_autocast: ClassVar[bool] = False
    autocast_dtype: torch.dtype | None = None  # set per device and PRECISION in __init__
    source: EncoderSource | None = None  # where tokenizer processes find the model's text encoder, if it reads text
    # The model's TorchScript forward (see app.tracing) once it is built and in use; until then, or
    # if it cannot be built, the eager model serves.
    compiled: Forward | None = None
    compile_pending: bool = False  # asked for (TRACE_MODELS on a CPU) and not yet tried
    costs_tokens: ClassVar[bool] = False  # an item's cost is its tokens, bounded per batch (MAX_BATCH_TOKENS)

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, precision: str = "auto",
                 compile_model: bool = False) -> None:
        self.manifest = checkpoint.manifest
        self.model = checkpoint.model
        self.device = device
        use_native = precision == "auto" and (device.type != "cpu" or self.cpu_autocast)
        self.autocast_dtype = native_autocast_dtype(device) if use_native else None
        self.compile_pending = compile_model

    def build_compiled(self) -> Forward | None:
        """The TorchScript forward, checked against eager, if one was asked for and not yet tried;
        not put in use (see ``InferenceWorker.compile``). Slow (tracing and checking): not on a request's path."""
        if not self.compile_pending:
            return None
        self.compile_pending = False
        return self._build_compiled()

    def compile(self) -> bool:
        """Build the TorchScript forward and use it from now on; True if one was built."""
        compiled = self.build_compiled()
        if compiled is not None:
            self.compiled = compiled
        return compiled is not None

    def _build_compiled(self) -> Forward | None:
        """The model as one TorchScript call checked against eager, or None (the default: none)."""
        return None

    @abc.abstractmethod
    def prepare(self, inputs: Sequence[Any], names: Sequence[str]) -> list[Any]:
        """Untrusted inputs → per-item payloads; ``ServiceError`` naming the item for bad input."""

    @abc.abstractmethod
    def collate(self, payloads: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Per-item payloads → keyword arguments of the model, on the device."""

    @abc.abstractmethod
    def warmup_payload(self) -> Any:
        """One valid payload, for warming the model up before the service turns ready."""

    async def prepare_async(self, inputs: Sequence[Any], names: Sequence[str], run_blocking: RunBlocking) -> list[Any]:
        """``prepare`` for the service's event loop: in a thread (``run_blocking``) unless a runner knows better."""
        payloads: list[Any] = await run_blocking(self.prepare, inputs, names)
        return payloads

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch)  # (B, classes) logits

    def calibrate(self, logits: torch.Tensor, calibration: Calibration) -> torch.Tensor:
        """Logits → the calibrated distribution, with the map fitted for the checkpoint."""
        return calibration.probabilities(logits)

    def item_cost(self, payload: Any) -> int:
        """What one payload adds to its batch's work, for the worker's fair queue (see app.worker)."""
        return 1


class ImageRunner(TaskRunner):
    """Bytes → uint8 (3, S, S) on the CPU; normalised on the device, where it is cheapest."""

    task = "image"
    cpu_autocast = True

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, max_pixels: int, precision: str = "auto",
                 trace: bool = False, slice_size: int = 0, request_pixels: int | None = None) -> None:
        # see app.tracing: on a CPU the traced forward runs without the GIL. Only architectures that
        # declare a pure tensor forward are traced: a trace silently drops Python side effects
        super().__init__(checkpoint, device, precision, trace and getattr(checkpoint.model, "traceable", False))
        # On a CPU a large batch runs faster in slices: the activations of one slice stay in the
        # caches (see Settings.cpu_image_slice). 0 = the whole batch in one call.
        self.slice_size = slice_size
        checkpoint.model.to(memory_format=torch.channels_last)  # what oneDNN and cuDNN convolve fastest
        self.preprocessing = ImagePreprocessing.from_manifest(checkpoint.manifest)
        self.max_pixels = max_pixels
        self.request_pixels = request_pixels if request_pixels is not None else 64 * max_pixels
        self.scales = self.preprocessing.scales(device)  # made once, not per batch

    def _build_compiled(self) -> Forward | None:
        generator = torch.Generator().manual_seed(0)
        size = self.preprocessing.size
        example, check = (self.collate(list(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                                          generator=generator)))["images"] for n in (2, 3))
        return trace_image_model(self.model, example, check, self.autocast_dtype)

    def prepare(self, inputs: Sequence[Any], names: Sequence[str]) -> list[Any]:
        return prepare_images(list(inputs), self.preprocessing, self.max_pixels, self.request_pixels, list(names))

    def collate(self, payloads: Sequence[Any]) -> dict[str, torch.Tensor]:
        images = torch.stack(list(payloads)).to(self.device, non_blocking=True)  # (B, 3, S, S) uint8
        images = self.preprocessing.normalize(images, self.scales)
        return {"images": images.contiguous(memory_format=torch.channels_last)}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["images"]
        run = self.compiled if self.compiled is not None else lambda part: model(images=part)
        if not self.slice_size or len(images) <= self.slice_size:
            return run(images)
        slices = -(-len(images) // self.slice_size)  # as few as the limit allows, near-equal: 17 → 9 + 8
        return torch.cat([run(part) for part in images.tensor_split(slices)])

    def warmup_payload(self) -> Any:
        size = self.preprocessing.size
        return torch.zeros(3, size, size, dtype=torch.uint8)


class TextRunner(TaskRunner):
    """Texts → 1-D id tensors (tokenised by the checkpoint's own encoder); right-padded per batch."""

    task = "text"
    source: EncoderSource
    costs_tokens = True  # a batch is padded to its longest text: its work is its size times that

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, precision: str = "auto",
                 tokenizer: TokenizerPool = IN_THREAD, script: bool = False) -> None:
        super().__init__(checkpoint, device, precision, script)
        self.source = _encoder_source(checkpoint, self.task, tokenizer, owner=self)
        self.encoder = load_encoder(self.source, checkpoint.manifest)  # the tokenizer processes load the same
        self.tokenizer = tokenizer

    def _build_compiled(self) -> Forward | None:
        # see app.tracing: checked on ids of every kind (known, unknown, padding)
        check = torch.randint(UNK_ID, len(self.encoder.vocabulary), (3, 24), generator=torch.Generator().manual_seed(0))
        check[2, 10:] = PAD_ID
        return script_text_model(self.model, check.to(self.device))

    def prepare(self, inputs: Sequence[Any], names: Sequence[str]) -> list[Any]:
        return self._padded(self.tokenizer.encode(self.source, self.encoder, list(inputs)))

    async def prepare_async(self, inputs: Sequence[Any], names: Sequence[str], run_blocking: RunBlocking) -> list[Any]:
        return self._padded(await self.tokenizer.encode_async(self.source, self.encoder, list(inputs), run_blocking))

    @staticmethod
    def _padded(ids: list[torch.Tensor]) -> list[torch.Tensor]:
        return [row if len(row) else torch.full((1,), PAD_ID) for row in ids]  # a text without tokens: one <pad>

    def collate(self, payloads: Sequence[Any]) -> dict[str, torch.Tensor]:
        token_ids = nn.utils.rnn.pad_sequence(list(payloads), batch_first=True, padding_value=0)  # (B, T)
        return {"token_ids": token_ids.to(self.device, non_blocking=True)}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compiled(batch["token_ids"]) if self.compiled is not None else model(**batch)

    def item_cost(self, payload: Any) -> int:
        return len(payload)  # its tokens

    def warmup_payload(self) -> Any:
        return _warmup_ids(self)


class Pair(NamedTuple):
    """One multimodal input: image bytes and text, either ``None`` when the pair lacks that side."""

    image: bytes | None
    text: str | None


class PairPayload(NamedTuple):
    image: torch.Tensor | None  # uint8 (3, S, S)
    token_ids: torch.Tensor | None  # (T,) real tokens only, T ≥ 1
    sentence_ids: torch.Tensor | None = None  # (L,) WordPiece ids, for a model with a sentence encoder


class MultimodalRunner(TaskRunner):
    """Pairs → (uint8 image or None, token ids or None); collated with the fusion models' own contract."""

    task = "multimodal"
    source: EncoderSource

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, max_pixels: int, precision: str = "auto",
                 tokenizer: TokenizerPool = IN_THREAD, request_pixels: int | None = None) -> None:
        super().__init__(checkpoint, device, precision)
        try:
            self.image_preprocessing, _ = fusion_preprocessing(checkpoint.manifest)
        except (FusionInputError, ImagePreprocessingError) as error:
            raise CheckpointError(f"{checkpoint.directory}: bad multimodal image preprocessing ({error!r})") from None
        self.source = _encoder_source(checkpoint, self.task, tokenizer, owner=self)
        self.encoder = load_encoder(self.source, checkpoint.manifest)
        # WordPiece for the model's sentence encoder, if it has one: cheap, and bounded by what the
        # encoder reads, so it runs in the service's preparation threads rather than a child process
        self.sentence_tokenizer = load_fusion_sentence_tokenizer(checkpoint.directory, checkpoint.manifest)
        self.tokenizer = tokenizer
        self.max_pixels = max_pixels
        self.request_pixels = request_pixels if request_pixels is not None else 64 * max_pixels

    def prepare(self, inputs: Sequence[Any], names: Sequence[str]) -> list[Any]:
        pairs: list[Pair] = list(inputs)
        texts = [pair.text for pair in pairs if pair.text is not None]
        images = self._images(pairs, names)
        encoded = self.tokenizer.encode(self.source, self.encoder, texts) if texts else []
        return self._payloads(pairs, names, images, encoded)

    async def prepare_async(self, inputs: Sequence[Any], names: Sequence[str], run_blocking: RunBlocking) -> list[Any]:
        """The images decoded in a thread while the texts go to the tokenizer pool, awaited here: a
        decoding thread never waits on a tokenizer process (a stalled one would hold it past the
        request's deadline). WordPiece, if the model reads it, in a thread too."""
        pairs: list[Pair] = list(inputs)
        texts = [pair.text for pair in pairs if pair.text is not None]
        decoding = run_blocking(self._images, pairs, names) if any(p.image is not None for p in pairs) else None
        tokenising = self.tokenizer.encode_async(self.source, self.encoder, texts, run_blocking) if texts else None
        images, encoded = await asyncio.gather(_or_nothing(decoding, [None] * len(pairs)), _or_nothing(tokenising, []))
        if self.sentence_tokenizer is None:
            return self._payloads(pairs, names, images, encoded)
        payloads: list[Any] = await run_blocking(self._payloads, pairs, names, images, encoded)
        return payloads

    def _images(self, pairs: Sequence[Pair], names: Sequence[str]) -> list[torch.Tensor | None]:
        return prepare_images([pair.image for pair in pairs], self.image_preprocessing, self.max_pixels,
                              self.request_pixels, list(names))

    def _payloads(self, pairs: Sequence[Pair], names: Sequence[str], images: Sequence[torch.Tensor | None],
                  encoded: Sequence[torch.Tensor]) -> list[PairPayload]:
        """Decoded images and the token ids of the pairs that have a text (in order) → payloads, with
        WordPiece ids for a model with a sentence encoder."""
        rows = iter(encoded)
        token_ids = [None if pair.text is None else next(rows) for pair in pairs]
        token_ids = [ids if ids is not None and len(ids) else None for ids in token_ids]  # no tokens: no text
        missing = first_pair_without_a_side([image is not None for image in images], [ids is not None for ids in token_ids])
        if missing is not None:  # the routes refuse a pair sent with neither side: here its text had no tokens
            raise InvalidInput(f"{names[missing]}: its text has no tokens left after the model's preprocessing and "
                               "it has no image; send a text with words in it, or an image")
        payloads = []
        for pair, image, ids in zip(pairs, images, token_ids, strict=True):
            pieces = None
            if self.sentence_tokenizer is not None and ids is not None and pair.text is not None:
                pieces = torch.tensor(self.sentence_tokenizer.encode(pair.text), dtype=torch.long)
            payloads.append(PairPayload(image, ids, pieces))
        return payloads

    def collate(self, payloads: Sequence[Any]) -> dict[str, torch.Tensor]:
        sentence = [p.sentence_ids for p in payloads] if self.sentence_tokenizer is not None else None
        return collate_fusion_batch([p.image for p in payloads], [p.token_ids for p in payloads],
                                    self.image_preprocessing, self.device, sentence_ids=sentence)

    def warmup_payload(self) -> Any:
        pieces = None
        if self.sentence_tokenizer is not None:
            pieces = torch.tensor(self.sentence_tokenizer.encode("warm up"), dtype=torch.long)
        size = self.image_preprocessing.size
        return PairPayload(torch.zeros(3, size, size, dtype=torch.uint8), _warmup_ids(self), pieces)


async def _or_nothing(work: Awaitable[Any] | None, nothing: Any) -> Any:
    return nothing if work is None else await work


def _warmup_ids(runner: TextRunner | MultimodalRunner) -> torch.Tensor:
    """Token ids to warm a text-reading model with. Tokenised here only when this process tokenises
    (no tokenizer processes): the first tokenisation imports spaCy, a second that readiness need not
    wait for when tokenizer processes do it for themselves."""
    if runner.tokenizer.processes < 1:
        return runner.tokenizer.encode(runner.source, runner.encoder, ["warm up"])[0]
    return torch.tensor([UNK_ID, UNK_ID, UNK_ID, UNK_ID])


def _image_runner(checkpoint: LoadedCheckpoint, device: torch.device, settings: Any,
                  tokenizer: TokenizerPool = IN_THREAD) -> TaskRunner:
    return ImageRunner(checkpoint, device, settings.max_image_pixels, settings.precision,
                       trace=settings.trace_models and device.type == "cpu",
                       slice_size=settings.cpu_image_slice if device.type == "cpu" else 0,
                       request_pixels=settings.max_request_pixels)


def _text_runner(checkpoint: LoadedCheckpoint, device: torch.device, settings: Any,
                 tokenizer: TokenizerPool = IN_THREAD) -> TaskRunner:
    return TextRunner(checkpoint, device, settings.precision, tokenizer,
                      script=settings.trace_models and device.type == "cpu")


def _multimodal_runner(checkpoint: LoadedCheckpoint, device: torch.device, settings: Any,
                       tokenizer: TokenizerPool = IN_THREAD) -> TaskRunner:
    return MultimodalRunner(checkpoint, device, settings.max_image_pixels, settings.precision, tokenizer,
                            request_pixels=settings.max_request_pixels)


# task → factory(checkpoint, device, settings, tokenizer pool = tokenise in the calling thread)
RUNNERS: dict[str, Callable[..., TaskRunner]] = {
    "image": _image_runner, "text": _text_runner, "multimodal": _multimodal_runner,
}
