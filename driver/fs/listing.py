"""A directory's entries from ListObjectsV2 pages, with the naming rules applied.

S3 returns objects and common prefixes each in key order. The rules: hidden keys are
skipped, the directory's own marker object (``prefix`` itself) is not an entry, and when
an object ``a`` and a prefix ``a/`` both exist the directory wins. ``a/`` does not always
follow ``a`` directly (``a-1`` and ``a.txt`` sort between them, maybe on the next page),
so a file entry is held back until the listing has passed the key where ``a/`` would be.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from driver.fs.names import DELIMITER, child_name
from driver.s3.api import ObjectClient, ObjectInfo


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    info: ObjectInfo | None  # None for a directory

    @property
    def is_dir(self) -> bool:
        return self.info is None


class DirectoryListing:
    """Pages through one prefix; ``next_batch`` returns entries until the listing ends."""

    def __init__(self, client: ObjectClient, prefix: str, *, page_size: int = 1000) -> None:
        self._client = client
        self._prefix = prefix
        self._page_size = page_size
        self._token: str | None = None
        self._started = False
        self.done = False
        # The last key listed (S3 order). Every name whose key and directory key (name +
        # "/") sort before it has had its entry returned, if it exists.
        self.listed_through = ""
        # Files waiting for the listing to pass where their directory twin would sort.
        self._pending: deque[tuple[str, Entry]] = deque()
        self._dirs_seen: set[str] = set()

    async def next_batch(self) -> list[Entry]:
        """The next entries (possibly none while files are held back); [] and ``done`` at the end."""
        if self.done:
            return []
        if self._started and self._token is None:
            self.done = True
            return self._drain()
        page = await self._client.list_objects(
            self._prefix,
            delimiter=DELIMITER,
            continuation_token=self._token,
            max_keys=self._page_size,
        )
        self._started = True
        self._token = page.next_token
        out: list[Entry] = []
        items = heapq.merge(
            ((o.key, o) for o in page.objects),
            ((p, None) for p in page.prefixes),
            key=lambda item: item[0],
        )
        for key, info in items:
            self._release_before(key, out)
            self.listed_through = key
            name = child_name(self._prefix, key)
            if name is None:
                continue  # hidden, or the directory's own marker
            if info is None:
                self._dirs_seen.add(name)
                # The directory wins over a held-back file of the same name.
                self._pending = deque(p for p in self._pending if p[1].name != name)
                out.append(Entry(name, None))
            else:
                self._pending.append((self._prefix + name + DELIMITER, Entry(name, info)))
        if self._token is None:
            self.done = True
            out.extend(self._drain())
        return out

    def _release_before(self, key: str, out: list[Entry]) -> None:
        while self._pending and self._pending[0][0] < key:
            out.append(self._pending.popleft()[1])

    def _drain(self) -> list[Entry]:
        out = [entry for _, entry in self._pending if entry.name not in self._dirs_seen]
        self._pending.clear()
        return out
