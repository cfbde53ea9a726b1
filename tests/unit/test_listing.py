"""Directory listings from ListObjectsV2 pages: naming rules and the directory-wins rule,
across page boundaries, checked against a reference model with Hypothesis."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.fs.listing import DirectoryListing
from driver.fs.names import is_valid_name
from driver.s3.memory import MemoryClient


def entries(keys, prefix="", page_size=1000):
    client = MemoryClient()
    for key in keys:
        client.put(key, b"")

    async def collect():
        listing = DirectoryListing(client, prefix, page_size=page_size)
        out = []
        while not listing.done:
            out.extend(await listing.next_batch())
        return out

    found = trio.run(collect)
    return {e.name: ("dir" if e.is_dir else "file") for e in found}, [e.name for e in found]


def reference(keys, prefix=""):
    """What the directory must show, straight from the rules."""
    shown = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if "/" in rest:
            name = rest.split("/", 1)[0]
            if is_valid_name(name):
                shown[name] = "dir"
        elif is_valid_name(rest) and shown.get(rest) != "dir":
            shown[rest] = "file"
    # A directory wins wherever it sorts.
    for key in keys:
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest and "/" in rest and is_valid_name(rest.split("/", 1)[0]):
            shown[rest.split("/", 1)[0]] = "dir"
    return shown


def test_directory_wins_when_file_and_prefix_are_pages_apart():
    keys = ["a", "a-1", "a-2", "a.txt", "a/x", "b"]
    for page_size in (1, 2, 3, 1000):
        shown, names = entries(keys, page_size=page_size)
        assert shown == {"a": "dir", "a-1": "file", "a-2": "file", "a.txt": "file", "b": "file"}
        assert len(names) == len(set(names))


def test_marker_and_hidden_keys():
    keys = ["d/", "d/f", "d//x", "d/./y", "d/" + "n" * 256]
    shown, _ = entries(keys, prefix="d/")
    assert shown == {"f": "file"}


segment = st.sampled_from(["a", "a-1", "a.b", "b", "", ".", "..", "c d", "z" * 3])
key = st.lists(segment, min_size=1, max_size=3).map("/".join)


@settings(max_examples=300, deadline=None)
@given(keys=st.sets(key, max_size=25), page_size=st.integers(1, 5),
       prefix=st.sampled_from(["", "a/", "a-1/"]))
def test_listing_matches_reference(keys, page_size, prefix):
    shown, names = entries(keys, prefix=prefix, page_size=page_size)
    assert len(names) == len(set(names)), "an entry was listed twice"
    assert shown == reference(keys, prefix)
