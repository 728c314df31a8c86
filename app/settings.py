"""Deployment configuration: one ``Settings`` read from the environment (and ``.env``), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_TOKEN_CHARS = 16


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(default=Path("checkpoints"), description="directory whose sub-directories are checkpoints")
    device: str = Field(default="auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="largest batch; 1 turns batching off")
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000, description="how long a batch may wait for more requests")
    # 32 texts read to the bundled text model's 1,024 tokens: smaller budgets cut honest text throughput
    # (docs/serving.md#fairness-one-clients-long-texts-do-not-hold-up-everyone-else)
    max_batch_tokens: int = Field(default=32_768, ge=1, description="padded tokens in one batch of texts (its texts "
                                  "times its longest): bounds how long a batch of long texts holds the worker")
    max_queue: int = Field(default=1024, ge=1, description="items admitted and not yet in a batch (decoding, "
                                                           "tokenising or queued) beyond which requests get 503")
    request_timeout: float = Field(default=30.0, gt=0, description="seconds a request may take from admission to "
                                                                    "its result, decoding and tokenising included (504)")
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="largest request body (413)")
    max_items_per_request: int = Field(default=64, ge=1, description="images or texts in one request")
    max_text_chars: int = Field(
        default=1_000_000, ge=1, description="longest accepted text, in characters (422); a text is cut to what its "
                                             "model reads before tokenising, so this only bounds the upload")
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="largest image, width × height, read from its header (413): the models "
                                               "read small inputs, so a large photo is allowed, a huge canvas is not")
    api_keys: SecretStr = Field(default=SecretStr(""), description="comma-separated keys; when set /v1 needs one")
    require_api_keys: bool = Field(default=False, description="refuse to start without API_KEYS (a deployment "
                                                              "reachable by others says so)")
    admin_token: SecretStr = Field(
        default=SecretStr(""), description="when set (16 characters or more, no API key), /admin loads, reloads and "
                                           "unloads models with 'Authorization: Bearer <token>'; unset, /admin is not "
                                           "served at all")
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
                                               "most this many (0: whole batches): a slice's "
                                               "activations stay in the CPU's caches, a whole large batch's do not")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (default: torch's)")
    tokenizer_processes: int | None = Field(
        default=None, ge=0, le=64, description="processes that tokenise texts, off the service's GIL (0: in threads; "
                                               "with 2 or more, one takes only small jobs, so short texts never wait "
                                               "behind long ones; default: one less than the CPUs this container may "
                                               "use, 2 to 4, or 1 on one CPU)")
    warmup: bool = Field(default=True, description="run example batches through every model before turning ready")
    opentelemetry: bool = Field(
        default=False, description="FastAPI's native OpenTelemetry spans, metrics and logs (needs an OpenTelemetry SDK "
                                   "and exporter set up); off by default, since it checks for providers on every "
                                   "request (event-loop time), and /metrics serves Prometheus either way")
    log_level: str = Field(default="INFO", description="logging level of the app's loggers")

    # ---- bounded work per request (hostile input and overload) ----
    max_request_pixels: int = Field(
        default=64 * 1024 * 1024, ge=1, description="pixels one request's images may decode in all, read from their "
                                                    "headers before decoding (413; a JPEG counts at its reduced scale)")
    max_preparing: int | None = Field(
        default=None, ge=1, le=256, description="requests decoding images at once, in threads (default: the CPUs "
                                                "this container may use, at least 2)")
    max_prepare_backlog: int = Field(
        default=256, ge=0, description="requests that may wait for a decoding thread; more get 503 at once")
    tokenizer_timeout: float = Field(
        default=5.0, gt=0, description="seconds a tokenizer process may spend on one batch before it is killed and "
                                       "replaced and the batch's requests get 422 (at most REQUEST_TIMEOUT / 4, so a "
                                       "request retried alone after a stuck shared batch still ends before its deadline)")

    # ---- the HTTP boundary: what a request may cost before it is refused ----
    max_json_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="largest JSON request body (413), below the upload limit: room "
        "for a full request of long texts even in scripts of several UTF-8 bytes a character or written as \\uXXXX "
        "escapes; bodies are parsed within a budget of values, so their cost grows with their size alone")
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, description="largest request line + headers (431)")
    header_timeout: float = Field(default=10.0, gt=0, description="seconds a connection may take to send a "
                                                                 "request's headers (408 and close: slowloris)")
    body_timeout: float = Field(default=30.0, gt=0, description="seconds a request's body may go without any part "
                                                               "of it arriving, once its headers are in (408)")
    keep_alive_timeout: int = Field(default=5, ge=1, description="seconds an idle kept-alive connection stays open")
    max_connections: int = Field(
        default=256, ge=1, description="requests being answered at once, beyond which a request gets 503 with "
        "Retry-After; /healthz and /readyz are always answered. Connections still sending their headers do not count "
        "(HEADER_TIMEOUT closes them), nor idle kept-alive ones (KEEP_ALIVE_TIMEOUT)")

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

    @model_validator(mode="after")
    def _check_api_keys_required(self) -> Settings:
        if self.require_api_keys and not self.api_key_set:
            raise ValueError("REQUIRE_API_KEYS is set but API_KEYS holds no key: set API_KEYS=key1,key2")
        return self

    @model_validator(mode="after")
    def _check_admin_token(self) -> Settings:
        token = self.admin_token.get_secret_value()
        if token and len(token.strip()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters (it can load any "
                             "model in MODEL_DIR): make one with `python -c 'import secrets; print(secrets.token_urlsafe())'`")
        if token and token.strip() in self.api_key_set:
            raise ValueError("ADMIN_TOKEN must differ from every key in API_KEYS: a client's key must not manage models")
        return self

    @property
    def admin_token_value(self) -> str:
        """The admin token, or "" when the admin endpoints are off."""
        return self.admin_token.get_secret_value().strip()

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
