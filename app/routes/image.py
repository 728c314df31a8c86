"""Image classification: multipart uploads in, calibrated distributions out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, Response, UploadFile

from app.errors import InvalidInput
from app.openapi import error_responses
from app.pipeline import classify
from app.routes.deps import ModelQuery, ServiceDep, TopKQuery, VersionQuery
from app.routes.guarded import GuardedRoute
from app.routes.limits import check_item_count
from app.schemas import ClassifyResponse

router = APIRouter(prefix="/v1/image", tags=["classify"], route_class=GuardedRoute)

_FILES_HELP = "images (JPEG, PNG, WebP, BMP or GIF; any size and mode), answered in order"


@router.post(
    "/classify", response_model=ClassifyResponse, summary="Classify images",
    description="Upload one or more images in the multipart field `files` (or one in `file`). The format is "
                "recognised from the bytes; each image is converted to RGB and resized as the model's preprocessing "
                "says. Each prediction carries the calibrated distribution over the model's classes.",
    responses=error_responses(400, 401, 404, 408, 413, 415, 422, 503, 504),
)
async def classify_images(
    request: Request,
    service: ServiceDep,
    files: Annotated[list[UploadFile] | None, File(description=_FILES_HELP)] = None,
    file: Annotated[UploadFile | None, File(description="a single image (instead of `files`)")] = None,
    model: ModelQuery = None,
    top_k: TopKQuery = 5,
    version: VersionQuery = None,
) -> Response:
    registry, _ = service.ready()
    served = registry.resolve(model, "image", version)
    uploads = [*(files or []), *([file] if file is not None else [])]
    if not uploads:
        raise InvalidInput("no images in the request: send them in the multipart field 'files' (or one in 'file')")
    check_item_count(len(uploads), service, "images")
    contents = [await upload.read() for upload in uploads]
    names = [f"image {index} ({upload.filename or 'unnamed'})" for index, upload in enumerate(uploads)]
    return await classify(request, service, served, contents, names, top_k)
