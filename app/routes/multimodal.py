"""Multimodal classification: image + text pairs in one multipart form, one calibrated distribution per pair.

The contract (also in the endpoint's OpenAPI description):

* images go in repeated ``files`` parts, texts in repeated ``texts`` fields; pair ``i`` is the
  ``i``-th file with the ``i``-th text;
* only ``texts`` (no ``files`` part at all): text-only pairs; only ``files``: image-only pairs;
* when both are sent their counts must be equal, and a pair lacking one side marks it with an empty
  value in its place: a ``texts`` field that is empty or only whitespace means "no text for this
  pair"; a ``files`` part with no bytes (an empty file, or an empty plain field such as curl's
  ``-F files=``) means "no image for this pair";
* a pair with neither side, a request with no pair, unequal counts: 422 with a message saying which.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from starlette.datastructures import UploadFile as FormFile

from app.errors import InvalidInput
from app.openapi import error_responses
from app.pipeline import classify
from app.routes.deps import ModelQuery, ServiceDep, TopKQuery, VersionQuery
from app.routes.guarded import GuardedRoute
from app.routes.limits import check_item_count
from app.schemas import ClassifyResponse
from app.tasks import Pair

router = APIRouter(prefix="/v1/multimodal", tags=["classify"], route_class=GuardedRoute)

_DESCRIPTION = """\
Classify image + text pairs (a photo and the post that came with it, say): one calibrated distribution per pair.

Send a `multipart/form-data` body with the images as repeated `files` parts and the texts as repeated `texts`
fields. They pair **by order**: pair *i* is the *i*-th file with the *i*-th text.

* **Both sides**: as many `files` parts as `texts` fields (unequal counts are a 422).
* **No text for a pair**: send an empty (or whitespace-only) `texts` field in its place.
* **No image for a pair**: send an empty `files` part in its place: a file with no bytes (an empty file input;
  `curl -F files=@/dev/null`) or an empty plain field (`curl -F files=`).
* **Text only**: send only `texts` fields (no `files` part at all). **Image only**: send only `files` parts.
* A pair with neither side is a 422.

Images are treated as on `/v1/image/classify` (JPEG, PNG, WebP, BMP or GIF; format recognised from the bytes;
converted and resized by the model's preprocessing); texts as on `/v1/text/classify` (the model's own tokenizer,
at most `MAX_TEXT_CHARS` characters each). At most `MAX_ITEMS_PER_REQUEST` pairs per request.

Example: `curl -F files=@beach.jpg -F texts="Best day ever at the beach" -F files= -F texts="ugh, stuck in traffic
again" -F files=@storm.jpg -F texts= 'http://127.0.0.1:8000/v1/multimodal/classify'` asks for three pairs: image and
text, text only, image only.
"""

_FILES_HELP = ("images (JPEG, PNG, WebP, BMP or GIF), one part per pair, in pair order; an empty part means no image "
               "for that pair")
_TEXTS_HELP = "texts, one field per pair, in pair order; an empty field means no text for that pair"

_RESPONSE_EXAMPLE: dict[str, Any] = {
    "model": {"name": "mvsa-fusion", "version": "1", "task": "multimodal"},
    "predictions": [
        {"label": "positive", "probability": 0.81,
         "top_k": [{"label": "positive", "probability": 0.81}, {"label": "neutral", "probability": 0.12},
                   {"label": "negative", "probability": 0.07}],
         "probabilities": {"negative": 0.07, "neutral": 0.12, "positive": 0.81}},
        {"label": "negative", "probability": 0.66,
         "top_k": [{"label": "negative", "probability": 0.66}, {"label": "positive", "probability": 0.22},
                   {"label": "neutral", "probability": 0.12}],
         "probabilities": {"negative": 0.66, "neutral": 0.12, "positive": 0.22}},
    ],
    "request_id": "7d1e0c2b9a8f4e3d8c7b6a5f4e3d2c1b",
}


@router.post(
    "/classify", response_model=ClassifyResponse, summary="Classify image + text pairs", description=_DESCRIPTION,
    responses={200: {"content": {"application/json": {"example": _RESPONSE_EXAMPLE}}},
               **error_responses(400, 401, 404, 408, 413, 415, 422, 503, 504)},
)
async def classify_pairs(
    request: Request,
    service: ServiceDep,
    files: Annotated[list[UploadFile | str] | None, File(description=_FILES_HELP)] = None,
    texts: Annotated[list[str] | None, Form(description=_TEXTS_HELP, examples=[
        ["Best day ever at the beach with the whole family", "ugh, stuck in traffic again"]])] = None,
    model: ModelQuery = None,
    top_k: TopKQuery = 5,
    version: VersionQuery = None,
) -> Response:
    """Pair ``files`` and ``texts`` by position (an empty value = that side is missing) and classify each pair.

    ``files`` is declared for validation and for the OpenAPI form; the parts themselves are read from
    the parsed form, which keeps the empty ones.
    """
    registry, _ = service.ready()
    served = registry.resolve(model, "multimodal", version)
    # FastAPI drops browser-style empty file inputs (filename "" and no bytes) from a list of uploads,
    # which would shift every later image onto the wrong text; the parsed form (cached: FastAPI read it
    # to fill ``files``) keeps every part, in order.
    parts: list[FormFile | str] = list((await request.form()).getlist("files"))
    given = texts or []
    if not parts and not given:
        raise InvalidInput("no inputs in the request: send a multipart/form-data body with images in 'files' "
                           "and/or texts in 'texts' (repeated fields, paired by order)")
    count = max(len(parts), len(given))
    check_item_count(count, service, "pairs")
    if parts and given and len(parts) != len(given):
        raise InvalidInput(f"{len(parts)} images ('files' parts) but {len(given)} texts ('texts' fields): pairs go by "
                           "order, so send one of each per pair; mark a pair's missing side with an empty value "
                           "(an empty 'texts' field, or an empty 'files' part)")
    pair_texts = _texts(given, service.settings.max_text_chars) if given else [None] * count
    pair_images: list[bytes | None] = [None] * count
    filenames: list[str] = [""] * count
    for index, part in enumerate(parts):
        if isinstance(part, str):
            if part:
                raise InvalidInput(f"pair {index}: the 'files' part is a plain form field, not a file: upload the image "
                                   "as a file (curl: -F files=@photo.jpg), or leave the part empty for no image")
            continue
        pair_images[index] = (await part.read()) or None
        filenames[index] = part.filename or ""
    pairs = [Pair(image, text) for image, text in zip(pair_images, pair_texts, strict=True)]
    for index, pair in enumerate(pairs):
        if pair.image is None and pair.text is None:
            raise InvalidInput(f"pair {index} has neither an image nor a text: send at least one side (an empty "
                               "'texts' field and an empty 'files' part leave nothing to classify)")
    names = [f"pair {index}" + (f" ({filename})" if filename else "") for index, filename in enumerate(filenames)]
    return await classify(request, service, served, pairs, names, top_k)


def _texts(texts: list[str], limit: int) -> list[str | None]:
    """Each text, or None where it is empty or only whitespace (no text for that pair); 422 past ``limit``."""
    result: list[str | None] = []
    for index, text in enumerate(texts):
        if len(text) > limit:
            raise InvalidInput(f"pair {index}: the text has {len(text):,} characters; at most {limit:,} are accepted "
                               "(MAX_TEXT_CHARS)")
        result.append(text if text.strip() else None)
    return result
