"""A new object being written front to back, uploaded while it is written.

Nothing is sent until a part is full; a file that ends smaller becomes one PutObject.
From the first full part on it is a multipart upload: each full part is uploaded while
the writer fills the next, at most ``parts_in_flight`` at once, those past the first only
while the mount's memory budget (``--max-memory``, shared with prefetching) has room. A
writer holds the part it fills and the parts in flight, whatever the file's size.
``complete`` uploads the rest and completes the upload; any failure aborts it, so no
incomplete upload is left behind, and is reported as EIO to every later call.
"""

from __future__ import annotations

import errno
import time

import structlog
import trio

from driver.fs.errors import FsError, from_store, unexpected
from driver.fs.prefetch import MemoryBudget
from driver.s3.api import MAX_PARTS, ObjectClient, ObjectClientError, ObjectInfo, UploadedPart

log = structlog.get_logger("pail.upload")


class Upload:
    def __init__(self, client: ObjectClient, key: str, *, part_size: int, parts_in_flight: int,
                 budget: MemoryBudget, nursery: trio.Nursery) -> None:
        self.key = key
        self.size = 0
        self._client = client
        self._part_size = part_size
        self._nursery = nursery
        self._chunks: list[bytes] = []  # what was written since the last part, as written
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: dict[int, UploadedPart] = {}
        self._started_parts = 0
        self._slots = trio.Semaphore(parts_in_flight)
        self._budget = budget
        self._part_finished = trio.Event()
        self._outstanding = 0
        self._idle = trio.Event()
        self._idle.set()
        self._lock = trio.Lock()  # one write or completion at a time, in order
        self._error: FsError | None = None
        self._result: ObjectInfo | None = None
        self.started = time.time()

    @property
    def max_size(self) -> int:
        return MAX_PARTS * self._part_size

    @property
    def done(self) -> bool:
        return self._result is not None

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        async with self._lock:
            if self._result is not None:
                raise FsError(errno.EPERM, "write after the object was completed (fsync)")
            if self._error is not None:
                raise self._error
            if offset != self.size:
                raise FsError(errno.EINVAL, f"write at {offset}, but the file ends at {self.size}: "
                                            "S3 objects are written front to back")
            if self.size + len(data) > self.max_size:
                raise FsError(errno.EFBIG, f"past {MAX_PARTS} parts of {self._part_size} bytes; "
                                           "a larger --write-part-size allows larger files")
            written = len(data)
            self.size += written
            data = data if isinstance(data, bytes) else bytes(data)  # the caller may reuse its buffer
            # A part goes once more data follows it: a file of exactly one part is then
            # one PutObject, and the last part is never empty.
            while data:
                if self._buffered == self._part_size:
                    await self._send(self._take())
                room = self._part_size - self._buffered
                piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
                self._chunks.append(piece)
                self._buffered += len(piece)
            return written

    async def truncate(self) -> None:
        """Start over with nothing written (truncate to 0 while writing)."""
        async with self._lock:
            if self._result is not None:
                raise FsError(errno.EPERM, "truncate after the object was completed")
            await self._idle.wait()
            await self._abort()
            self._chunks.clear()
            self._buffered = 0
            self._parts.clear()
            self._started_parts = 0
            self._error = None
            self.size = 0

    async def complete(self) -> ObjectInfo:
        """The object is in S3 when this returns; EIO (and no upload left) when it is not."""
        async with self._lock:
            if self._result is not None:
                return self._result
            if self._error is None:
                try:
                    self._result = await self._finish()
                    return self._result
                except ObjectClientError as exc:
                    if self._error is None:  # else a part failed and said why already
                        self._error = from_store(exc, during="upload")
                        self._log_failure(exc)
            await self._idle.wait()
            await self._abort()
            raise self._error

    async def abort(self) -> None:
        """Discard everything (the writer gave up, or the mount is ending)."""
        async with self._lock:
            if self._result is None:
                await self._idle.wait()
                await self._abort()
                self._error = self._error or FsError(errno.EIO, "upload abandoned")

    # -- parts -------------------------------------------------------------------------

    async def _finish(self) -> ObjectInfo:
        if self._upload_id is None:
            return await self._client.put_object(self.key, self._take())
        if self._buffered:
            await self._send(self._take())
        await self._idle.wait()
        if self._error is not None:
            raise _Failed()
        parts = [self._parts[n] for n in sorted(self._parts)]
        return await self._client.complete_multipart_upload(self.key, self._upload_id, parts, self.size)

    def _take(self) -> bytes:
        """What was written since the last part, as one ``bytes``, copied once. Not a
        bytearray: botocore's signer wraps the body in a BytesIO, which shares a bytes
        object and copies anything else."""
        part = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        return part

    async def _send(self, data: bytes) -> None:
        if self._upload_id is None:
            try:
                self._upload_id = await self._client.create_multipart_upload(self.key)
            except ObjectClientError as exc:
                self._error = from_store(exc, during="write")
                self._log_failure(exc)
                raise self._error from None
        await self._slots.acquire()  # backpressure: the writer waits for a free slot
        try:
            await self._charge(len(data))
        except BaseException:
            self._slots.release()
            raise
        if self._error is not None:
            self._slots.release()
            self._budget.release(len(data))
            raise self._error
        self._started_parts += 1
        self._outstanding += 1
        self._idle = trio.Event() if self._outstanding == 1 else self._idle
        self._nursery.start_soon(self._upload_part, self._started_parts, data)

    async def _charge(self, size: int) -> None:
        """Take a part in flight from the mount's memory budget, which readers' prefetching
        shares. A writer's first part in flight is charged anyway, so every writer goes on;
        more wait for room, or for one of this upload's parts to finish and give back its
        own."""
        while self._outstanding and not self._budget.try_reserve(size):
            await self._part_finished.wait()
        if not self._outstanding:
            self._budget.reserve_anyway(size)

    async def _upload_part(self, number: int, data: bytes) -> None:
        try:
            self._parts[number] = await self._client.upload_part(self.key, self._upload_id, number, data)
        except ObjectClientError as exc:
            if self._error is None:
                self._error = from_store(exc, during="write")
                self._log_failure(exc, part=number)
        except Exception as exc:
            if self._error is None:
                self._error = unexpected(exc, during="write", key=self.key, part=number)
        finally:
            self._slots.release()
            self._budget.release(len(data))
            self._part_finished.set()
            self._part_finished = trio.Event()
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()

    async def _abort(self) -> None:
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            await self._client.abort_multipart_upload(self.key, upload_id)
        except ObjectClientError as exc:
            # Nothing more to do from here: a lifecycle rule (AbortIncompleteMultipartUpload)
            # cleans up what a failed abort leaves.
            log.error("abort of failed upload failed", op="upload", key=self.key, **exc.log_fields())

    def _log_failure(self, exc: ObjectClientError, **fields: object) -> None:
        log.warning("upload failed", op="upload", key=self.key, size=self.size, **fields, **exc.log_fields())


class _Failed(ObjectClientError):
    """A part failed earlier; its error is already recorded."""

    def __init__(self) -> None:
        super().__init__("a part failed", operation="UploadPart")
