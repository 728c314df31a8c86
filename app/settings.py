"""Deployment configuration: one ``Settings`` read from the environment (and ``.env``), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(default=Path("checkpoints"), description="directory whose sub-directories are checkpoints")
    device: str = Field(default="auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="largest batch; 1 turns batching off")
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000, description="how long a batch may wait for more requests")
    max_queue: int = Field(default=1024, ge=1, description="queued items beyond which requests get 503")
    request_timeout: float = Field(default=30.0, gt=0, description="seconds a request may wait for its result (504)")
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="largest request body (413)")
    max_items_per_request: int = Field(default=64, ge=1, description="images or texts in one request")
    max_text_chars: int = Field(default=20_000, ge=1, description="longest accepted text, in characters")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="largest image, width × height (413)")
    api_keys: SecretStr = Field(default=SecretStr(""), description="comma-separated keys; when set /v1 needs one")
    drain_timeout: float = Field(default=30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    default_image_model: str | None = Field(default=None, description="default image model (else first by name)")
    default_text_model: str | None = Field(default=None, description="default text model (else first by name)")
    default_multimodal_model: str | None = Field(default=None, description="default multimodal model")
    precision: Literal["auto", "fp32"] = Field(
        default="auto", description="auto: autocast to bf16/fp16 on CUDA, and image models to bf16 on CPUs with native "
                                    "bf16 (AVX-512 BF16, AMX); fp32: full precision everywhere")
    trace_models: bool = Field(
        default=True, description="run models as TorchScript on a CPU (image models traced, the n-gram text model "
                                  "scripted; checked equal to eager when built, just after the service turns "
                                  "ready): one call that releases the GIL, so request handling no longer stalls it")
    cpu_image_slice: int = Field(
        default=16, ge=0, le=4096, description="on a CPU, a batch of images goes through the model in slices of at "
                                               "most this many (0: whole batches): larger slices overflow the CPU's "
                                               "caches (default model, 2 AVX2 cores: 87 images/s in slices of 16, "
                                               "79 as one batch of 32, 70 as one of 64)")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (default: torch's)")
    tokenizer_processes: int | None = Field(
        default=None, ge=0, le=64, description="processes that tokenise texts, off the service's GIL (0: in threads; "
                                               "default: one less than the CPUs, 1 to 4)")
    warmup: bool = Field(default=True, description="run example batches through every model before turning ready")
    opentelemetry: bool = Field(
        default=False, description="FastAPI's native OpenTelemetry spans, metrics and logs (needs an OpenTelemetry SDK "
                                   "and exporter set up); off: its per-request check of the providers cost 6% of the "
                                   "event loop's time under load, and /metrics serves Prometheus either way")
    log_level: str = Field(default="INFO", description="logging level of the app's loggers")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as error:
                raise ValueError(f"DEVICE={value!r} is not a torch device ({error})") from None
        return value

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip())

    def default_model(self, task: str) -> str | None:
        return {"image": self.default_image_model, "text": self.default_text_model,
                "multimodal": self.default_multimodal_model}.get(task)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
