"""What one request to `umarvel serve` may ask: apart from the service, so the CLI shows the
defaults without importing the web stack or the model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Request bounds and batching of the HTTP service; the defaults suit a 7B model on one GPU."""

    max_request_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 20_000
    max_k: int = 1000
    max_batch: int = 32
    batch_wait_ms: float = 5.0
