"""An in-memory object store with S3's listing and conditional-read semantics.

For unit tests of the filesystem core: no network, no threads, deterministic. It records
every call so tests can count requests the way the proxy does for the real client.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from dataclasses import dataclass

import trio

from driver.s3.api import (
    MIN_PART_SIZE,
    ListPage,
    NoSuchKey,
    ObjectClientError,
    ObjectInfo,
    PreconditionFailed,
    UploadedPart,
)


@dataclass(frozen=True, slots=True)
class Call:
    operation: str
    key: str
    start: int = 0
    length: int = 0


class MemoryClient:
    """Objects in a dict; keys kept sorted for listing."""

    def __init__(self, *, latency: float = 0.0, rate: float | None = None,
                 min_part_size: int = MIN_PART_SIZE, copies_in_flight: int = 2) -> None:
        self._data: dict[str, bytes] = {}
        self.copies_in_flight = copies_in_flight  # as the S3 client it stands in for
        self.min_part_size = min_part_size
        self.uploads: dict[str, tuple[str, dict[int, bytes]]] = {}  # upload id -> key, parts
        self._next_upload = 0
        # Operation name -> number of calls still to fail (with a 500), for error paths.
        self.failures: dict[str, int] = {}
        self._info: dict[str, ObjectInfo] = {}
        self._keys: list[str] = []
        self._version = 0
        self.latency = latency  # seconds each request takes, to let prefetches overlap
        # Bytes per second of each GET's body, as one connection to a distant S3 delivers it.
        self.rate = rate
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- what tests do "from outside", like another S3 client would --------------------

    def put(self, key: str, data: bytes, *, mtime: float | None = None, parts: int = 0) -> ObjectInfo:
        """Store ``data`` as ``key``; with ``parts``, under the ETag S3 gives an object
        uploaded in that many parts (``<hex>-<parts>``)."""
        self._version += 1
        etag = hashlib.md5(data + str(self._version).encode()).hexdigest()
        etag = f'"{etag}-{parts}"' if parts else f'"{etag}"'
        info = ObjectInfo(key=key, size=len(data), etag=etag, mtime=mtime or time.time())
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = bytes(data)
        self._info[key] = info
        return info

    def delete(self, key: str) -> None:
        if key in self._data:
            del self._data[key]
            del self._info[key]
            self._keys.remove(key)

    def keys(self) -> list[str]:
        return list(self._keys)

    # -- ObjectClient -------------------------------------------------------------------

    async def _request(self, call: Call) -> None:
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            transfer = call.length / self.rate if self.rate and call.operation == "GetObject" else 0.0
            await trio.sleep(self.latency + transfer)
        finally:
            self.in_flight -= 1
        if self.failures.get(call.operation, 0) > 0:
            self.failures[call.operation] -= 1
            raise ObjectClientError(f"{call.operation} {call.key}: injected 500",
                                    operation=call.operation, status=500, code="InternalError")

    async def head_bucket(self) -> None:
        await self._request(Call("HeadBucket", ""))

    async def head_object(self, key: str) -> ObjectInfo:
        await self._request(Call("HeadObject", key))
        try:
            return self._info[key]
        except KeyError:
            raise NoSuchKey(f"no object {key!r}", operation="HeadObject", status=404) from None

    async def list_objects(
        self,
        prefix: str,
        *,
        delimiter: str = "/",
        continuation_token: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        await self._request(Call("ListObjectsV2", prefix))
        # The token says what was returned last: "K" + a key or "P" + a common prefix.
        if continuation_token is None:
            i = bisect.bisect_left(self._keys, prefix)
        else:
            i = self._skip_past(continuation_token[1:], common=continuation_token[0] == "P")
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        last: str | None = None
        while i < len(self._keys) and len(objects) + len(prefixes) < max_keys:
            key = self._keys[i]
            if not key.startswith(prefix):
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[: cut + len(delimiter)]
                prefixes.append(common)
                last = "P" + common
                i = self._skip_past(common, common=True)
                continue
            objects.append(self._info[key])
            last = "K" + key
            i += 1
        more = i < len(self._keys) and self._keys[i].startswith(prefix)
        return ListPage(objects=objects, prefixes=prefixes, next_token=last if more else None)

    def _skip_past(self, entry: str, *, common: bool) -> int:
        """Index of the first key after ``entry`` and, for a common prefix, after all under it."""
        i = bisect.bisect_right(self._keys, entry)
        if common:
            while i < len(self._keys) and self._keys[i].startswith(entry):
                i += 1
        return i

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        await self._request(Call("GetObject", key, start, length))
        info = self._info.get(key)
        if info is None:
            raise NoSuchKey(f"no object {key!r}", operation="GetObject", status=404)
        if info.etag != etag:
            raise PreconditionFailed(f"{key!r} changed", operation="GetObject", status=412)
        return self._data[key][start : start + length]

    async def put_object(self, key: str, data: bytes | memoryview) -> ObjectInfo:
        await self._request(Call("PutObject", key, 0, len(data)))
        return self.put(key, bytes(data))

    async def create_multipart_upload(self, key: str) -> str:
        await self._request(Call("CreateMultipartUpload", key))
        self._next_upload += 1
        upload_id = f"upload-{self._next_upload}"
        self.uploads[upload_id] = (key, {})
        return upload_id

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes | memoryview) -> UploadedPart:
        await self._request(Call("UploadPart", key, number, len(data)))
        if upload_id not in self.uploads:
            raise ObjectClientError(f"no upload {upload_id}", operation="UploadPart", status=404, code="NoSuchUpload")
        self.uploads[upload_id][1][number] = bytes(data)
        return UploadedPart(number, '"%s"' % hashlib.md5(data).hexdigest())

    async def complete_multipart_upload(self, key: str, upload_id: str, parts: list[UploadedPart],
                                        size: int) -> ObjectInfo:
        await self._request(Call("CompleteMultipartUpload", key))
        _, stored = self.uploads.pop(upload_id)
        numbers = [p.number for p in parts]
        if numbers != sorted(numbers) or set(numbers) != set(stored):
            raise ObjectClientError("parts out of order or missing", operation="CompleteMultipartUpload",
                                    status=400, code="InvalidPartOrder")
        if any(len(stored[n]) < self.min_part_size for n in numbers[:-1]):
            raise ObjectClientError("part too small", operation="CompleteMultipartUpload",
                                    status=400, code="EntityTooSmall")
        return self.put(key, b"".join(stored[n] for n in numbers), parts=len(numbers))

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await self._request(Call("AbortMultipartUpload", key))
        self.uploads.pop(upload_id, None)

    async def delete_object(self, key: str) -> None:
        await self._request(Call("DeleteObject", key))
        self.delete(key)

    async def aclose(self) -> None:
        pass
