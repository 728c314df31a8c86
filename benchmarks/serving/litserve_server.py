"""The peer to beat: LitServe serving the same checkpoint with its own dynamic batching.

Same preprocessing (``app.preprocess.prepare_image``, or the text checkpoint's own encoder), same
normalisation, precision (``models.precision``), model and calibrated softmax, and the same response
shape as ``POST /v1/{image,text}/classify``, so the comparison is about the serving stack. An image
travels as base64 in JSON (``{"image": ...}``): LitServe pickles each request to its inference
process, and a multipart upload cannot be pickled. A text travels as ``{"text": ...}``.

Usage: ``python benchmarks/serving/litserve_server.py CHECKPOINT_DIR --port 8001``.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import litserve as ls
import torch

from app.preprocess import configure_pillow, prepare_image
from models.calibration import Calibration
from models.checkpoint import load_checkpoint, read_manifest
from models.precision import native_autocast_dtype
from models.preprocessing import ImagePreprocessing
from models.text_encoding import load_text_encoder

MAX_PIXELS = 40_000_000


class ImageClassifierAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, top_k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint, self.top_k = checkpoint, top_k

    def setup(self, device: str) -> None:
        configure_pillow(MAX_PIXELS)
        loaded = load_checkpoint(self.checkpoint, device)
        # not ``self.device``: LitServe sets that attribute itself (to a string)
        self.model, self.manifest, self.torch_device = loaded.model, loaded.manifest, torch.device(device)
        self.calibration = Calibration.from_manifest(self.manifest.calibration)
        self.model.to(memory_format=torch.channels_last)
        self.preprocessing = ImagePreprocessing.from_manifest(self.manifest)
        self.scales = self.preprocessing.scales(device)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe then parses the JSON
        # {"image": base64}: LitServe hands requests to its worker process by pickling, which an upload cannot be
        return prepare_image(base64.b64decode(request["image"]), self.preprocessing, MAX_PIXELS)  # (3, S, S) uint8

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)  # (B, 3, S, S)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        dtype = native_autocast_dtype(self.torch_device)  # what our service's PRECISION=auto does for image models
        autocast = torch.autocast(self.torch_device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            images = self.preprocessing.normalize(images.to(self.torch_device), self.scales)
            logits = self.model(images.contiguous(memory_format=torch.channels_last))
            return self.calibration.probabilities(logits).cpu()  # (B, classes)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return calibrated_response(output, self.manifest, self.top_k)


class TextClassifierAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, top_k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint, self.top_k = checkpoint, top_k

    def setup(self, device: str) -> None:
        loaded = load_checkpoint(self.checkpoint, device)
        self.model, self.manifest, self.torch_device = loaded.model, loaded.manifest, torch.device(device)
        self.calibration = Calibration.from_manifest(self.manifest.calibration)
        self.encoder = load_text_encoder(self.checkpoint, self.manifest)

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        ids = self.encoder.encode([request["text"]])[0]  # (T,), 0 = padding
        return ids[ids != 0]

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=0)  # (B, T)

    def predict(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(token_ids=token_ids.to(self.torch_device))
            return self.calibration.probabilities(logits).cpu()  # (B, classes)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return calibrated_response(output, self.manifest, self.top_k)


def calibrated_response(output: torch.Tensor, manifest: Any, top_k: int) -> dict[str, Any]:
    values, classes = output.tolist(), manifest.classes
    order = sorted(range(len(values)), key=lambda i: -values[i])[:top_k]
    return {
        "model": {"name": manifest.name, "version": manifest.version, "task": manifest.task},
        "predictions": [{
            "label": classes[order[0]], "probability": values[order[0]],
            "top_k": [{"label": classes[i], "probability": values[i]} for i in order],
            "probabilities": dict(zip(classes, values, strict=True)),
        }],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    api_class = TextClassifierAPI if read_manifest(args.checkpoint).task == "text" else ImageClassifierAPI
    api = api_class(args.checkpoint, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                    api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
