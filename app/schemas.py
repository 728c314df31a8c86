"""Request and response bodies of the public API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TopK(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    label: str = Field(description="the most probable class (arg-max of `probabilities`)")
    probability: float = Field(ge=0, le=1, description="its calibrated probability")
    top_k: list[TopK] = Field(description="the `top_k` most probable classes, most probable first")
    probabilities: dict[str, float] = Field(description="the full calibrated distribution over the classes (sums to 1)")


class ModelRef(BaseModel):
    name: str
    version: str
    task: str


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction] = Field(description="one prediction per input, in input order")
    request_id: str

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name": "cifar10-fastconv", "version": "1", "task": "image"},
        "predictions": [{
            "label": "cat", "probability": 0.82,
            "top_k": [{"label": "cat", "probability": 0.82}, {"label": "dog", "probability": 0.11}],
            "probabilities": {"airplane": 0.001, "automobile": 0.001, "bird": 0.02, "cat": 0.82, "deer": 0.01,
                              "dog": 0.11, "frog": 0.03, "horse": 0.005, "ship": 0.002, "truck": 0.001},
        }],
        "request_id": "3f2c9a0e5b7d4c1a8e6f0b2d4a6c8e0f",
    }]})


class TextClassifyRequest(BaseModel):
    """Either `texts` (a list) or `text` (one string)."""

    texts: list[str] | None = Field(None, description="texts to classify, answered in order",
                                    json_schema_extra={"minItems": 1})
    text: str | None = Field(None, description="a single text (instead of `texts`)", json_schema_extra={"minLength": 1})

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["texts"]}, {"required": ["text"]}],
        "examples": [
            {"texts": ["The shuttle launch was delayed by a faulty sensor on the booster.",
                       "Which graphics card runs X11 best under Linux?"]},
            {"text": "The goalie made 40 saves in the playoff game last night."},
        ],
    })


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="the version described (in a list: the model's default version)")
    versions: list[str] = Field(description="every loaded version of the model, oldest first (`version=` on the "
                                            "classify routes picks one)")
    task: str
    architecture: str
    classes: list[str]
    preprocessing: dict[str, Any]
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any] | None = Field(description="the parent checkpoint this one was trained from, if any")
    data_fingerprint: str
    code_version: str
    created_at: str
    weights_sha256: str
    device: str
    runtime: Literal["torchscript", "eager"] = Field(
        description="how the model runs: 'torchscript' (one compiled call, TRACE_MODELS on a CPU; built just after "
                    "the service turns ready), 'eager' (PyTorch module by module)")
    default: bool = Field(description="whether this is its task's default model")


class ModelList(BaseModel):
    models: list[ModelInfo]
    defaults: dict[str, str] = Field(description="task → default model name")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="starting, ready, draining or failed")
    detail: str = ""
    models: list[str] = []


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong and what to do about it")
    errors: list[FieldError] | None = Field(None, description="for 422: each invalid field")
