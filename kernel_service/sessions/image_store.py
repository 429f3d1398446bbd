"""A session's image store: the images its code displayed, kept in the state store for
their URLs, the oldest dropped past a count and a size."""

import base64
import logging
from collections import deque
from dataclasses import dataclass

from kernel_service.config import MIB, Settings
from kernel_service.errors import ImageNotFound, StateFull
from kernel_service.execution.images import image_payloads, png_size
from kernel_service.store.records import SessionTotals
from kernel_service.store.state import StateStore
from kernel_service_client.models import IMAGE_URL_TEMPLATE, Image, Output
from kernel_service_client.outputs import ImagePayload

log = logging.getLogger(__name__)

_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
}


@dataclass(frozen=True)
class StoredImage:
    mime: str
    data: str  # base64

    def content(self) -> bytes:
        return base64.b64decode(self.data)


class ImageStore:
    """Gives each image an id and a URL at once; stores and evicts on the store's thread."""

    def __init__(
        self,
        session_id: str,
        key: str,
        store: StateStore,
        settings: Settings,
        totals: SessionTotals,
    ) -> None:
        self._session_id = session_id
        self._key = key
        self._store = store
        self._max_count = settings.images_per_session
        self._max_bytes = settings.image_store_mb * MIB
        self._seq = max((int(i.split(".")[0]) for i, _ in totals.images), default=0)
        # kept on the store's thread only: (id, size), oldest first, and their bytes
        self._kept = deque(totals.images)
        self._kept_bytes = sum(size for _, size in totals.images)

    async def keep(self, outputs: list[Output]) -> list[Image]:
        """The images in `outputs`, each stored under a new id (one that cannot be stored is
        in the result still, but not at its URL)."""
        payloads = [(self._next_id(p), p) for p in image_payloads(outputs)]
        if payloads:
            await self._store.hand_over(lambda: self._store_all(payloads))
        return [self._image(image_id, payload) for image_id, payload in payloads]

    async def get(self, image_id: str) -> StoredImage:
        found = await self._store.image(self._key, image_id)
        if found is None:
            raise ImageNotFound(self._session_id, image_id)
        return StoredImage(*found)

    def _next_id(self, payload: ImagePayload) -> str:
        self._seq += 1
        return f"{self._seq}.{_EXTENSIONS.get(payload.mime, 'bin')}"

    def _store_all(self, payloads: list[tuple[str, ImagePayload]]) -> None:
        """On the store's thread: add each, then drop the oldest past the bounds."""
        for image_id, payload in payloads:
            try:
                self._store.add_image_now(self._key, image_id, payload.mime, payload.data)
            except StateFull as exc:
                log.error("session %s: image not stored: %s", self._session_id, exc)
            else:
                self._kept.append((image_id, len(payload.data)))
                self._kept_bytes += len(payload.data)
            dropped: list[str] = []
            while len(self._kept) > self._max_count or (
                self._kept_bytes > self._max_bytes and len(self._kept) > 1
            ):
                dropped_id, dropped_size = self._kept.popleft()
                dropped.append(dropped_id)
                self._kept_bytes -= dropped_size
            if dropped:
                self._store.remove_images_now(self._key, dropped)

    def _image(self, image_id: str, payload: ImagePayload) -> Image:
        size = png_size(payload.data) if payload.mime == "image/png" else None
        return Image(
            mime=payload.mime,
            data=payload.data,
            url=IMAGE_URL_TEMPLATE.format(session_id=self._session_id, image_id=image_id),
            width=size[0] if size else None,
            height=size[1] if size else None,
        )
