"""CSI call logging never leaks credentials: strip_secrets (driven by the csi_secret
option, plus the service-account tokens key) and the LoggingInterceptor on a real grpc
server, with logs captured at debug level."""

from __future__ import annotations

import io
import json
import logging
from concurrent import futures

import grpc
import pytest
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from csi import csi_pb2, csi_pb2_grpc
from driver import log as pail_log
from driver.csi.interceptor import LoggingInterceptor
from driver.csi.sanitize import STRIPPED, TOKENS_KEY, strip_secrets

TOKEN = "eyJhbGciOiJSUzI1NiJ9.tok3n-payload.sig"
TOKENS_JSON = json.dumps({"sts.amazonaws.com": {"token": TOKEN, "expirationTimestamp": "2030-01-01T00:00:00Z"}})

# Every CSI v1.12 message with a csi_secret field; test_every_secret_message_is_covered
# fails when the proto gains one, so this list (and the parametrized test) keeps up.
SECRET_MESSAGES = sorted([
    "CreateVolumeRequest", "DeleteVolumeRequest", "ControllerPublishVolumeRequest",
    "ControllerUnpublishVolumeRequest", "ValidateVolumeCapabilitiesRequest",
    "ControllerModifyVolumeRequest", "CreateSnapshotRequest", "DeleteSnapshotRequest",
    "ListSnapshotsRequest", "GetSnapshotRequest", "ControllerExpandVolumeRequest",
    "NodeStageVolumeRequest", "NodePublishVolumeRequest", "NodeExpandVolumeRequest",
    "CreateVolumeGroupSnapshotRequest", "DeleteVolumeGroupSnapshotRequest",
    "GetVolumeGroupSnapshotRequest", "GetMetadataAllocatedRequest", "GetMetadataDeltaRequest",
])


def _all_messages(descriptors=None):
    for md in descriptors if descriptors is not None else csi_pb2.DESCRIPTOR.message_types_by_name.values():
        yield md
        yield from _all_messages(md.nested_types)


def _secret_fields(md):
    return [f for f in md.fields if f.GetOptions().Extensions[csi_pb2.csi_secret]]


def test_every_secret_message_is_covered():
    found = sorted(md.name for md in _all_messages() if _secret_fields(md))
    assert found == SECRET_MESSAGES


@pytest.mark.parametrize("name", SECRET_MESSAGES)
def test_secrets_are_stripped(name):
    cls = getattr(csi_pb2, name)
    msg = cls()
    for field in _secret_fields(cls.DESCRIPTOR):
        getattr(msg, field.name)[f"key-s3cr3t-{field.name}"] = f"s3cr3t-{name}-{field.name}"
    if "volume_id" in cls.DESCRIPTOR.fields_by_name:
        msg.volume_id = "vol-kept"
    out = strip_secrets(msg)
    text = json.dumps(out)
    assert "s3cr3t" not in text
    for field in _secret_fields(cls.DESCRIPTOR):
        assert out[field.name] == STRIPPED
    if "volume_id" in cls.DESCRIPTOR.fields_by_name:
        assert out["volume_id"] == "vol-kept"


VOLUME_CONTEXT_MESSAGES = sorted(md.full_name for md in _all_messages() if "volume_context" in md.fields_by_name)


def test_volume_context_messages_are_the_expected_ones():
    assert {f"csi.v1.{name}" for name in (
        "NodePublishVolumeRequest", "NodeStageVolumeRequest", "ControllerPublishVolumeRequest",
        "ValidateVolumeCapabilitiesRequest", "ValidateVolumeCapabilitiesResponse.Confirmed", "Volume",
    )} <= set(VOLUME_CONTEXT_MESSAGES)


@pytest.mark.parametrize("name", VOLUME_CONTEXT_MESSAGES)
def test_service_account_tokens_are_stripped_other_keys_kept(name):
    msg = message_factory.GetMessageClass(csi_pb2.DESCRIPTOR.pool.FindMessageTypeByName(name))()
    msg.volume_context[TOKENS_KEY] = TOKENS_JSON
    msg.volume_context["csi.storage.k8s.io/pod.name"] = "web-0"
    out = strip_secrets(msg)
    assert TOKEN not in json.dumps(out)
    assert out["volume_context"] == {TOKENS_KEY: STRIPPED, "csi.storage.k8s.io/pod.name": "web-0"}


def test_tokens_stripped_in_create_volume_response_volume():
    resp = csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(
        volume_id="v1", capacity_bytes=5, volume_context={TOKENS_KEY: TOKENS_JSON, "bucket": "b"}))
    out = strip_secrets(resp)
    assert out == {"volume": {"volume_id": "v1", "capacity_bytes": 5,
                              "volume_context": {TOKENS_KEY: STRIPPED, "bucket": "b"}}}


def test_nested_repeated_and_map_secret_fields_are_stripped():
    """CSI's secret fields are all top-level: a test-only proto checks the recursion."""
    pool = descriptor_pool.Default()
    try:
        outer = pool.FindMessageTypeByName("pailtest.Outer")
    except KeyError:
        fp = descriptor_pb2.FileDescriptorProto(name="pail_test/nested.proto", package="pailtest",
                                                syntax="proto3", dependency=[csi_pb2.DESCRIPTOR.name])
        inner = fp.message_type.add(name="Inner")
        inner.field.add(name="token", number=1, type=9, label=1).options.Extensions[csi_pb2.csi_secret] = True
        inner.field.add(name="name", number=2, type=9, label=1)
        out_md = fp.message_type.add(name="Outer")
        out_md.field.add(name="items", number=1, type=11, label=3, type_name=".pailtest.Inner")
        out_md.field.add(name="one", number=2, type=11, label=1, type_name=".pailtest.Inner")
        entry = out_md.nested_type.add(name="ByNameEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=9, label=1)
        entry.field.add(name="value", number=2, type=11, label=1, type_name=".pailtest.Inner")
        out_md.field.add(name="by_name", number=3, type=11, label=3, type_name=".pailtest.Outer.ByNameEntry")
        pool.Add(fp)
        outer = pool.FindMessageTypeByName("pailtest.Outer")
    msg = message_factory.GetMessageClass(outer)()
    msg.items.add(token="s3cr3t-a", name="a")
    msg.one.token = "s3cr3t-b"
    msg.by_name["x"].token = "s3cr3t-c"
    assert strip_secrets(msg) == {"items": [{"token": STRIPPED, "name": "a"}], "one": {"token": STRIPPED},
                                  "by_name": {"x": {"token": STRIPPED}}}


def test_enums_and_plain_fields_render():
    msg = csi_pb2.NodePublishVolumeRequest(volume_id="v", readonly=True, volume_capability=csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["ro"])))
    out = strip_secrets(msg)
    assert out["volume_capability"] == {"mount": {"mount_flags": ["ro"]}, "access_mode": {"mode": "SINGLE_NODE_WRITER"}}
    assert strip_secrets(None) is None


# --- the interceptor on a real server ---------------------------------------------------

class _Node(csi_pb2_grpc.NodeServicer):
    def NodePublishVolume(self, request, context):
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id missing")
        if request.volume_id == "vol-boom":
            raise RuntimeError("boom")
        return csi_pb2.NodePublishVolumeResponse()


class _Identity(csi_pb2_grpc.IdentityServicer):
    def Probe(self, request, context):
        return csi_pb2.ProbeResponse()


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def csi_stubs(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[LoggingInterceptor()])
    csi_pb2_grpc.add_NodeServicer_to_server(_Node(), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(_Identity(), server)
    address = f"unix:{tmp_path}/csi.sock"
    assert server.add_insecure_port(address)
    server.start()
    channel = grpc.insecure_channel(address)
    yield csi_pb2_grpc.NodeStub(channel), csi_pb2_grpc.IdentityStub(channel)
    channel.close()
    server.stop(None)


def _publish(volume_id):
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, target_path="/var/lib/kubelet/pods/p/volumes/x/mount",
        secrets={"secretAccessKey": f"s3cr3t-{volume_id or 'empty'}"},
        volume_context={TOKENS_KEY: TOKENS_JSON, "csi.storage.k8s.io/pod.name": "web-0"})


def _call_all(node, identity):
    node.NodePublishVolume(_publish("vol-ok"))
    with pytest.raises(grpc.RpcError) as invalid:
        node.NodePublishVolume(_publish(""))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        node.NodePublishVolume(_publish("vol-boom"))
    assert unknown.value.code() == grpc.StatusCode.UNKNOWN
    identity.Probe(csi_pb2.ProbeRequest())


def _events(buf):
    return [e for e in map(json.loads, buf.getvalue().splitlines()) if e.get("event") == "grpc call"]


@pytest.mark.parametrize("debug", [True, False])
def test_interceptor_logs_one_event_per_call(csi_stubs, restore_logging, debug):
    buf = io.StringIO()
    pail_log.configure("json", debug=debug, stream=buf)
    _call_all(*csi_stubs)

    text = buf.getvalue()
    assert "s3cr3t" not in text and TOKEN not in text
    events = _events(buf)
    publish = "/csi.v1.Node/NodePublishVolume"
    ok, invalid, boom, *probe = events
    assert (ok["method"], ok["volume_id"], ok["code"], ok["level"]) == (publish, "vol-ok", "OK", "info")
    assert ok["target_path"] == "/var/lib/kubelet/pods/p/volumes/x/mount" and ok["duration_ms"] >= 0
    assert "details" not in ok
    assert (invalid["method"], invalid["code"], invalid["level"]) == (publish, "INVALID_ARGUMENT", "warning")
    assert invalid["details"] == "volume_id missing" and "volume_id" not in invalid
    assert (boom["volume_id"], boom["code"], boom["level"]) == ("vol-boom", "UNKNOWN", "error")
    assert "boom" in boom["details"] and "RuntimeError" in boom["exception"]
    if debug:
        assert [(p["method"], p["code"], p["level"]) for p in probe] == [("/csi.v1.Identity/Probe", "OK", "debug")]
        assert ok["request"]["secrets"] == STRIPPED
        assert ok["request"]["volume_context"] == {TOKENS_KEY: STRIPPED, "csi.storage.k8s.io/pod.name": "web-0"}
    else:
        assert probe == []
        assert all("request" not in e for e in events)


def test_library_log_lines_carry_the_bound_volume_id():
    stream = io.StringIO()
    pail_log.configure("json", stream=stream)
    structlog.contextvars.bind_contextvars(volume_id="pv-7")
    try:
        structlog.get_logger("pail.test").info("ours")
        logging.getLogger("botocore.retries").warning("a library's line")
    finally:
        structlog.contextvars.unbind_contextvars("volume_id")
        pail_log.configure("console")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("volume_id"), e.get("level")) for e in events] == \
        [("ours", "pv-7", "info"), ("a library's line", "pv-7", "warning")]
