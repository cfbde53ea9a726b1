"""What the CSI servers accept from Kubernetes objects: volume-context keys, mountOptions
and dynamic volume ids (driver.csi.context, .mount_flags, .volume_id)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from driver.cli import build_parser
from driver.config import validate_bucket
from driver.csi import context
from driver.csi.context import ContextError, parse_bool
from driver.csi.mount_flags import (
    ALLOWED,
    FLAGS,
    MAX_VALUE_BYTES,
    NODE_VALUED,
    REFUSED,
    VALUE_OPTIONS,
    MountFlagError,
    parse_mount_flags,
)
from driver.csi.volume_id import MAX_VOLUME_ID_BYTES, VolumeIdTooLong, VolumeRef, decode, encode

# --- context ---


def test_context_keys_are_the_documented_strings():
    assert (context.BUCKET_NAME, context.PREFIX, context.ENDPOINT, context.REGION) == (
        "bucketName", "prefix", "endpoint", "region")
    assert (context.FORCE_PATH_STYLE, context.AUTHENTICATION_SOURCE, context.STS_REGION) == (
        "forcePathStyle", "authenticationSource", "stsRegion")
    assert context.AUTH_SOURCES == {"driver", "pod"}
    assert context.SERVICE_ACCOUNT_TOKENS == "csi.storage.k8s.io/serviceAccount.tokens"
    assert context.EPHEMERAL == "csi.storage.k8s.io/ephemeral"
    assert context.PV_NAME == "csi.storage.k8s.io/pv/name"
    assert context.PVC_NAMESPACE == "csi.storage.k8s.io/pvc/namespace"
    assert (context.BASE_PREFIX, context.DELETE_POLICY, context.BUCKET_PER_VOLUME,
            context.BUCKET_NAME_PREFIX) == ("basePrefix", "deletePolicy", "bucketPerVolume",
                                            "bucketNamePrefix")
    assert context.DELETE_POLICIES == {"retain", "delete"}
    for key in context.KUBELET_KEYS | {context.PV_NAME, context.PVC_NAME, context.PVC_NAMESPACE}:
        assert key.startswith(context.PROVISIONER_PREFIX)


def test_inline_volumes_cannot_pick_the_endpoint():
    assert context.INLINE_VOLUME_KEYS == {"bucketName", "prefix", "region",
                                          "authenticationSource", "stsRegion"}
    assert context.INLINE_VOLUME_KEYS < context.VOLUME_ATTRIBUTES
    assert not context.INLINE_VOLUME_KEYS & {context.ENDPOINT, context.FORCE_PATH_STYLE}


@pytest.mark.parametrize("text,expected", [("true", True), ("TRUE", True), ("True", True),
                                           ("false", False), ("FaLsE", False)])
def test_parse_bool(text, expected):
    assert parse_bool(text, "forcePathStyle") is expected


@pytest.mark.parametrize("text", ["", "yes", "1", "0", "on", " true", "true\n", "t"])
def test_parse_bool_refuses_anything_else(text):
    with pytest.raises(ContextError) as caught:
        parse_bool(text, "forcePathStyle")
    assert isinstance(caught.value, ValueError)
    assert caught.value.key == "forcePathStyle"
    assert str(caught.value) == f"forcePathStyle: {caught.value.message}"
    assert repr(text) in caught.value.message


# --- mount flags ---


@pytest.mark.parametrize("flags,expected", [
    ([], []),
    (["uid=1000"], ["--uid", "1000"]),
    (["--uid=1000"], ["--uid", "1000"]),
    (["uid 1000"], ["--uid", "1000"]),
    (["--uid 1000"], ["--uid", "1000"]),
    (["  uid = 1000 \n"], ["--uid", "1000"]),
    (["read-only"], ["--read-only"]),
    (["--read-only"], ["--read-only"]),
    ([" allow-delete\t"], ["--allow-delete"]),
    (["gid=2000", "allow-overwrite", "--file-mode 0600", "debug"],
     ["--gid", "2000", "--allow-overwrite", "--file-mode", "0600", "--debug"]),
    (["prefix=a:b/c=d e"], ["--prefix", "a:b/c=d e"]),
    (["prefix a=b"], ["--prefix", "a=b"]),
    (["sse=aws:kms", "sse-kms-key-id=arn:aws:kms:us-east-1:123456789012:key/k"],
     ["--sse", "aws:kms", "--sse-kms-key-id", "arn:aws:kms:us-east-1:123456789012:key/k"]),
    (["metadata-ttl=indefinite", "max-memory=1GiB", "write-part-size=16MiB",
      "request-timeout=5", "storage-class=STANDARD_IA", "requester-pays",
      "expected-bucket-owner=123456789012", "upload-checksums=off", "region=eu-west-1",
      "dir-mode=0750"],
     ["--metadata-ttl", "indefinite", "--max-memory", "1GiB", "--write-part-size", "16MiB",
      "--request-timeout", "5", "--storage-class", "STANDARD_IA", "--requester-pays",
      "--expected-bucket-owner", "123456789012", "--upload-checksums", "off",
      "--region", "eu-west-1", "--dir-mode", "0750"]),
    # A value that looks like an option stays a value.
    (["uid=-1"], ["--uid=-1"]),
    (["prefix=--foreground"], ["--prefix=--foreground"]),
    (["uid=1000 --allow-other"], ["--uid", "1000 --allow-other"]),
])
def test_parse_mount_flags(flags, expected):
    assert parse_mount_flags(flags) == expected


def test_every_allowed_option_is_a_pail_mount_option():
    parser = build_parser()
    mount = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith("mount"))
    known = {s[2:] for action in mount._actions for s in action.option_strings if s.startswith("--")}
    assert ALLOWED <= known
    assert set(REFUSED) <= known
    assert known - {"help"} == ALLOWED | set(REFUSED), "a new pail mount option: allow or refuse it"
    flags = {s[2:] for action in mount._actions if action.nargs == 0 for s in action.option_strings}
    assert FLAGS <= flags and not VALUE_OPTIONS & flags


def test_every_allowed_option_is_in_the_readmes_table_of_mount_options():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Mount options", 1)[1]
    first_cells = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z][a-z-]*)(?:=[^`]*)?`", cell)}
    assert ALLOWED <= documented, f"not in README's mount options: {sorted(ALLOWED - documented)}"


@pytest.mark.parametrize("flags", [
    ["uid=-1", "prefix=--foreground", "gid=--allow-root"],
    ["prefix=--endpoint-url=http://evil", "read-only"],
    ["uid=1000 --allow-other"],
])
def test_arguments_parse_as_intended(flags):
    """Whatever the values, argparse sees only the options that were allowed."""
    try:
        args = parse_mount_flags(flags)
    except MountFlagError:
        return
    namespace = _parse_pail_mount(args)
    assert namespace.endpoint_url is None and not namespace.allow_other and not namespace.foreground


def _parse_pail_mount(args):
    return build_parser().parse_args(["mount", "bucket", "/mnt", *args])


def test_value_starting_with_dash_reaches_pail_mount_as_a_value():
    namespace = _parse_pail_mount(parse_mount_flags(["prefix=--foreground", "uid=-1"]))
    assert namespace.prefix == "--foreground" and namespace.uid == "-1"
    assert not namespace.foreground


@pytest.mark.parametrize("option", sorted(REFUSED))
@pytest.mark.parametrize("form", ["{}", "--{}", "{}=x", "--{} x"])
def test_refused_options(option, form):
    entry = form.format(option)
    with pytest.raises(MountFlagError) as caught:
        parse_mount_flags(["uid=1", entry])
    written = entry.split("=")[0].split(" ")[0]
    assert caught.value.option == written
    assert repr(written) in str(caught.value)
    assert caught.value.reason == REFUSED[option]


@pytest.mark.parametrize("flags,option,reason", [
    (["nonsense"], "nonsense", "not an option"),
    (["--ro"], "--ro", "not an option"),
    (["allow_other"], "allow_other", "not an option"),
    (["UID=1"], "UID", "not an option"),
    (["-uid=1"], "-uid", "not an option"),
    (["---uid=1"], "---uid", "not an option"),
    (["--"], "--", "not an option"),
    (["=1000"], "=1000", "no option name"),
    ([""], "", "empty"),
    (["  \t"], "  \t", "empty"),
    (["read-only=true"], "read-only", "takes no value"),
    (["--debug 1"], "--debug", "takes no value"),
    (["read-only="], "read-only", "takes no value"),
    (["uid"], "uid", "needs a value"),
    (["--uid="], "--uid", "needs a value"),
    (["uid =  "], "uid", "needs a value"),
    (["prefix=a\0b"], "prefix", "NUL"),
    (["prefix=a\nb"], "prefix", "line break"),
    (["prefix a\rb"], "prefix", "line break"),
    (["prefix=" + "x" * (MAX_VALUE_BYTES + 1)], "prefix", "longer than 4096 bytes"),
    (["prefix=" + "é" * (MAX_VALUE_BYTES // 2 + 1)], "prefix", "longer than 4096 bytes"),
    (["uid=1", "--uid=2"], "--uid", "more than once"),
    (["read-only", "read-only"], "read-only", "more than once"),
])
def test_refused_entries(flags, option, reason):
    with pytest.raises(MountFlagError) as caught:
        parse_mount_flags(flags)
    assert caught.value.option == option
    assert reason in caught.value.reason
    assert isinstance(caught.value, ValueError)


def test_value_of_exactly_the_limit_passes():
    assert parse_mount_flags(["prefix=" + "x" * MAX_VALUE_BYTES]) == ["--prefix", "x" * MAX_VALUE_BYTES]


def test_long_option_names_are_shortened_in_the_message():
    with pytest.raises(MountFlagError) as caught:
        parse_mount_flags(["y" * 10_000])
    assert caught.value.option == "y" * 10_000
    # The name is cut to 80 characters; the rest is the list of allowed options.
    assert len(str(caught.value)) < 150 + len(", ".join(sorted(ALLOWED)))


CACHE_DIR = "/var/cache/pail/0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("flags,expected", [
    (["cache"], ["--cache", CACHE_DIR]),
    ([" --cache "], ["--cache", CACHE_DIR]),
    (["read-only", "cache", "max-cache-size=64MiB"],
     ["--read-only", "--cache", CACHE_DIR, "--max-cache-size", "64MiB"]),
    (["--max-cache-size 2GiB", "cache"], ["--max-cache-size", "2GiB", "--cache", CACHE_DIR]),
    (["read-only"], ["--read-only"]),
])
def test_cache_is_a_flag_whose_directory_the_node_server_gives(flags, expected):
    args = parse_mount_flags(flags, cache_dir=CACHE_DIR)
    assert args == expected
    namespace = _parse_pail_mount(args)
    assert namespace.cache == (CACHE_DIR if "--cache" in expected else None)


@pytest.mark.parametrize("flags,option,reason", [
    (["cache=/etc"], "cache", "chosen by the node server"),
    (["--cache=/etc"], "--cache", "chosen by the node server"),
    (["cache /etc"], "cache", "chosen by the node server"),
    (["cache="], "cache", "chosen by the node server"),
    (["cache", "--cache"], "--cache", "more than once"),
    (["max-cache-size=1GiB"], "max-cache-size", "add the 'cache' mount option"),
    (["--max-cache-size 1GiB", "read-only"], "--max-cache-size", "add the 'cache' mount option"),
    (["cache", "max-cache-size"], "max-cache-size", "needs a value"),
])
def test_refused_cache_entries(flags, option, reason):
    with pytest.raises(MountFlagError) as caught:
        parse_mount_flags(flags, cache_dir=CACHE_DIR)
    assert caught.value.option == option
    assert reason in caught.value.reason


def test_cache_needs_a_node_server_with_a_cache_directory():
    with pytest.raises(MountFlagError) as caught:
        parse_mount_flags(["cache"])
    assert caught.value.option == "cache" and "no cache directory" in caught.value.reason
    assert NODE_VALUED == {"cache"} and not NODE_VALUED & (FLAGS | VALUE_OPTIONS)


def test_one_string_is_not_a_list_of_flags():
    with pytest.raises(TypeError):
        parse_mount_flags("read-only")


def _options_in(args):
    """The option names in parse_mount_flags output, checking its shape on the way."""
    names, i = [], 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--")
        name, eq, _ = token[2:].partition("=")
        names.append(name)
        if name in FLAGS:
            assert not eq
            i += 1
        elif eq:
            assert token.startswith(f"--{name}=-")
            i += 1
        else:
            value = args[i + 1]
            assert value and not value.startswith("-") and "\n" not in value and "\0" not in value
            i += 2
    return names


_FLAG_ENTRY = st.builds(
    lambda dashes, name, sep, value, pad: f"{pad}{dashes}{name}{sep}{value}{pad}",
    st.sampled_from(["", "--", "-"]),
    st.sampled_from(sorted(ALLOWED | set(REFUSED)) + ["bogus", ""]),
    st.sampled_from(["", "=", " ", " = "]),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\t\n"]),
)


@given(st.lists(st.text() | _FLAG_ENTRY))
@example(["uid=1", "endpoint-url=http://x"])
@example(["read-only", "prefix=--allow-other"])
@example(["cache", "max-cache-size=1GiB"])
@example(["max-cache-size=1GiB"])
@example(["cache=--allow-other"])
def test_parse_mount_flags_never_lets_a_refused_option_through(flags):
    try:
        args = parse_mount_flags(flags, cache_dir=CACHE_DIR)
    except MountFlagError as exc:
        assert any(exc.option in f for f in flags)
        return
    names = _options_in(args)
    assert set(names) <= ALLOWED
    assert len(names) == len(set(names)) == len(flags)


# --- volume ids ---

_BUCKETS = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True).filter(
    lambda b: ".." not in b)
_PRINTABLE = st.text(st.characters().filter(str.isprintable), max_size=120)
_PREFIXES = st.just("") | _PRINTABLE.map(lambda t: t + "/")


@given(bucket=_BUCKETS, prefix=_PREFIXES, delete_objects=st.booleans(), bucket_per_volume=st.booleans())
@example(bucket="abc", prefix="a:b/c:/::/", delete_objects=True, bucket_per_volume=False)
@example(bucket="a" * 63, prefix="", delete_objects=True, bucket_per_volume=True)
def test_volume_ids_round_trip(bucket, prefix, delete_objects, bucket_per_volume):
    validate_bucket(bucket)
    ref = VolumeRef(bucket, prefix, delete_objects, bucket_per_volume)
    flags = ("b" if bucket_per_volume else "") + ("d" if delete_objects else "")
    length = len(f"pail1:{flags or '-'}:{bucket}/{prefix}".encode())
    try:
        volume_id = encode(ref)
    except VolumeIdTooLong as exc:
        assert exc.length == length > MAX_VOLUME_ID_BYTES
        assert str(MAX_VOLUME_ID_BYTES) in str(exc) and str(exc.length) in str(exc)
        return
    assert len(volume_id.encode()) == length
    assert len(volume_id.encode()) <= MAX_VOLUME_ID_BYTES
    assert volume_id.startswith("pail1:") and volume_id.isprintable()
    assert decode(volume_id) == ref


@given(st.text())
@example("pail1:-:bucket/p/")
@example("pail1:db:bucket/p/")
def test_decode_accepts_only_what_encode_makes(volume_id):
    ref = decode(volume_id)
    if ref is not None:
        assert encode(ref) == volume_id


@pytest.mark.parametrize("ref,volume_id", [
    (VolumeRef("data", "vols/pvc-1/", False, False), "pail1:-:data/vols/pvc-1/"),
    (VolumeRef("data", "pvc-1/", True, False), "pail1:d:data/pvc-1/"),
    (VolumeRef("pail-pvc-1", "", False, True), "pail1:b:pail-pvc-1/"),
    (VolumeRef("pail-pvc-1", "", True, True), "pail1:bd:pail-pvc-1/"),
    (VolumeRef("data", "a:b//c/", True, False), "pail1:d:data/a:b//c/"),
])
def test_volume_id_format(ref, volume_id):
    assert encode(ref) == volume_id
    assert decode(volume_id) == ref


@pytest.mark.parametrize("volume_id", [
    "", "my-static-volume", "s3-csi-driver-volume", "data/prefix/", "pail1", "pail1:",
    "pail2:-:data/p/", "PAIL1:-:data/p/", "pail1:data/p/", "pail1::data/p/", "pail1:db:data/p/",
    "pail1:x:data/p/", "pail1:dd:data/p/", "pail1:-:data", "pail1:-:data/p", "pail1:-:/p/",
    "pail1:-:Data/p/", "pail1:-:data\n/p/", "pail1:-:data/p\n/", "pail1:-:data/p\0/",
    "pail1:-:arn:aws:s3:us-east-1:123456789012:accesspoint/ap/p/",
    "pail1:-:" + "a" * 63 + "/" + "p" * 60 + "/",
])
def test_decode_refuses_other_ids(volume_id):
    assert decode(volume_id) is None


@pytest.mark.parametrize("ref", [
    VolumeRef("Bad_Bucket", "p/", False, False),
    VolumeRef("arn:aws:s3:us-east-1:123456789012:accesspoint/ap", "p/", False, False),
    VolumeRef("abc\n", "p/", False, False),
    VolumeRef("data", "no-slash", False, False),
    VolumeRef("data", "a\nb/", False, False),
    VolumeRef("data", "a\0b/", False, False),
    VolumeRef("data", "a\u2028b/", False, False),
    VolumeRef("data", "zero\u200bwidth/", False, False),
])
def test_encode_refuses_what_it_cannot_encode(ref):
    with pytest.raises(ValueError) as caught:
        encode(ref)
    assert not isinstance(caught.value, VolumeIdTooLong)


def test_encode_refuses_ids_over_128_bytes():
    assert len(encode(VolumeRef("b" * 63, "p" * 54 + "/", True, True)).encode()) == 128
    with pytest.raises(VolumeIdTooLong) as caught:
        encode(VolumeRef("b" * 63, "p" * 55 + "/", True, True))
    assert caught.value.length == 129 and caught.value.limit == 128
    with pytest.raises(VolumeIdTooLong) as caught:  # counted in UTF-8 bytes
        encode(VolumeRef("data", "é" * 60 + "/", False, False))
    assert caught.value.length == len("pail1:-:data/".encode()) + 121
