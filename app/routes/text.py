"""Text classification: JSON texts in, calibrated distributions out."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.errors import InvalidInput
from app.openapi import error_responses
from app.pipeline import classify
from app.routes.deps import ModelQuery, ServiceDep, TopKQuery, VersionQuery
from app.routes.guarded import GuardedRoute
from app.routes.limits import check_item_count, checked_text
from app.schemas import ClassifyResponse, TextClassifyRequest

router = APIRouter(prefix="/v1/text", tags=["classify"], route_class=GuardedRoute)


@router.post(
    "/classify", response_model=ClassifyResponse, summary="Classify texts",
    description="Send `{\"texts\": [...]}` (or `{\"text\": \"...\"}`). Each text is tokenised with the model's "
                "own vocabulary; each prediction carries the calibrated distribution over the model's classes.",
    responses=error_responses(401, 404, 408, 413, 415, 422, 503, 504),
)
async def classify_texts(
    request: Request, body: TextClassifyRequest, service: ServiceDep, model: ModelQuery = None, top_k: TopKQuery = 5,
    version: VersionQuery = None,
) -> Response:
    registry, _ = service.ready()
    served = registry.resolve(model, "text", version)
    if body.texts is not None and body.text is not None:
        raise InvalidInput("send either 'texts' (a list) or 'text' (one string), not both")
    texts = body.texts if body.texts is not None else ([] if body.text is None else [body.text])
    check_item_count(len(texts), service, "texts")
    for index, text in enumerate(texts):
        checked_text(text, f"text {index}", service.settings.max_text_chars)
    names = [f"text {index}" for index in range(len(texts))]
    return await classify(request, service, served, texts, names, top_k)
