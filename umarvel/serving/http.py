"""`umarvel serve`: a thin HTTP JSON layer over `Retriever` (FastAPI + uvicorn, the `serve` extra).

Routes: `POST /search` {text?, image? (base64), instruction?, k} -> ranked hits; `POST /encode`
{text?, image?, instruction?} -> the unit vector; `GET /health` -> the model, its fingerprint and the
index size. Concurrent requests are batched (`MicroBatcher`). Everything a client sends is checked
before it reaches the model: body size, JSON shape, k, text length, image bytes and pixels; each
problem is a 4xx with a one-line message, never a 500. Images come as bytes only: a URL or a
server path is refused, so the service never fetches or reads what a client names.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from umarvel.errors import UmarvelError
from umarvel.serving.batcher import MicroBatcher
from umarvel.serving.limits import Limits


class ClientError(Exception):
    """A request the service refuses: its HTTP status and the one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = None
    instruction: str | None = None


class SearchBody(Item):
    k: int = 10


def create_app(retriever, limits: Limits = Limits()) -> FastAPI:
    """The service over `retriever` (a loaded umarvel.serving.Retriever)."""
    # Under a rule that makes a vector depend on its batch (umarvel-release: an unpadded batch runs
    # causally), a request is encoded alone, so an answer never depends on who else asked.
    alone = bool(getattr(retriever.embedder.rules, "unpadded_causal", False))
    max_batch = 1 if alone else limits.max_batch
    wait_s = limits.batch_wait_ms / 1000

    def search_batch(payloads):
        hits = retriever.search([item for item, _ in payloads], k=max(k for _, k in payloads))
        return [found[:k] for found, (_, k) in zip(hits, payloads)]

    searches = MicroBatcher(search_batch, max_batch=max_batch, wait_s=wait_s, name="search")
    encodes = MicroBatcher(lambda items: list(retriever.encode(items)), max_batch=max_batch, wait_s=wait_s,
                           name="encode")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        searches.close()
        encodes.close()

    app = FastAPI(title="umarvel", summary="multimodal search over an umarvel index", lifespan=lifespan)

    @app.exception_handler(ClientError)
    async def refused(request: Request, error: ClientError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(UmarvelError)
    async def bad_item(request: Request, error: UmarvelError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", **retriever.describe(), "batching": {"max_batch": max_batch, "wait_ms": limits.batch_wait_ms}}

    @app.post("/search")
    async def search(request: Request):
        body = await _parsed(request, SearchBody, limits)
        if not 1 <= body.k <= limits.max_k:
            raise ClientError(422, f"k must be between 1 and {limits.max_k}, got {body.k}")
        hits = await asyncio.wrap_future(searches.submit((_item(body, limits), body.k)))
        return {"hits": [asdict(hit) for hit in hits]}

    @app.post("/encode")
    async def encode(request: Request):
        body = await _parsed(request, Item, limits)
        vector = await asyncio.wrap_future(encodes.submit(_item(body, limits)))
        return {"embedding": [float(x) for x in vector], "dimension": len(vector)}

    return app


async def _parsed(request: Request, model: type[BaseModel], limits: Limits) -> BaseModel:
    """The JSON body as `model`, read no further than the size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise ClientError(413, f"request body of {declared} bytes is over the limit of {limits.max_request_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_request_bytes:
            raise ClientError(413, f"request body is over the limit of {limits.max_request_bytes} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ClientError(422, f"{where}: {first['msg']}") from None


def _item(body: Item, limits: Limits) -> dict:
    """The request's item dict as `Embedder.encode` reads it, every field checked."""
    for name in ("text", "instruction"):
        value = getattr(body, name)
        if value is not None and len(value) > limits.max_text_chars:
            raise ClientError(413, f"{name} has {len(value)} characters, over the limit of {limits.max_text_chars}")
    if not body.text and body.image is None:
        raise ClientError(422, "give a non-empty text, an image (base64) or both")
    item = {"text": body.text} if body.text else {}
    if body.image is not None:
        item["image"] = _image(body.image, limits)
    if body.instruction:
        item["instruction"] = body.instruction
    return item


def _image(encoded: str, limits: Limits) -> Image.Image:
    """A base64 image (a data: URL's payload accepted), its size checked before its pixels are decoded."""
    if encoded.startswith(("http://", "https://", "file:", "/", "ftp://")):
        raise ClientError(422, "image must be the image file's bytes in base64; URLs and paths are not fetched")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "image is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - PIL raises several types for bytes that are not an image
        raise ClientError(400, "image bytes are not an image file PIL can read") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ClientError(413, f"image of {width}x{height} pixels is over the limit of {limits.max_image_pixels}")
    try:
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - truncated or corrupt image data
        raise ClientError(400, "image bytes are damaged (they could not be decoded)") from None
