"""examples/ are valid Kubernetes objects that Pail accepts as written.

Every object is checked against the Kubernetes schemas (strict: an unknown or misplaced
field fails). Then the examples are played through the driver's own code as Kubernetes
would: each static PV is published for each pod that uses it (NodePublishVolume, with
the volume context, access mode, readonly flag, fsGroup, secrets and service-account
tokens kubelet would send), and each StorageClass provisions a volume (CreateVolume, as
csi-provisioner calls it) which is then published the same way. Nothing is mounted and
no S3 request is made: the node's mount manager records what it was asked to mount, and
the controller's bucket checks are left out. So a volume attribute, parameter or mount
option that the driver would refuse, or a secret or service account an example forgets,
fails here rather than in a user's pod events. Last, the static example is mounted for
real (node server over its socket, a local S3 server, FUSE) to see its options at work.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import botocore.session
import grpc
import pytest

from csi import csi_pb2
from driver import credentials
from driver.csi import context as ctx
from driver.csi.controller import PARAMETERS, ControllerService, ControllerSettings
from driver.csi.errors import CsiError
from driver.csi.identity import DRIVER_NAME
from driver.csi.mount_flags import parse_mount_flags
from driver.csi.mounts import MountManager, MountSpec
from driver.csi.node import NodeService
from driver.csi.volume_credentials import ROLE_ARN_ANNOTATION, PodIdentitySettings
from driver.csi.volume_id import decode
from tests.deploy.manifests import ROOT, describe, load_file, schema_errors
from tests.support.csi_server import ACCESS_MODES, capability
from tests.support.kubelet import Kubelet, NodeServer, Pod

EXAMPLES = ROOT / "examples"
# What the README and the issue promise users will find there.
EXPECTED = {"static-pv.yaml", "dynamic-storageclass.yaml", "pod-identity.yaml", "read-only.yaml",
            "secret-credentials.yaml"}

KUBELET_DIR = "/var/lib/kubelet"
SIZE_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def _files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


class Objects:
    """Every object of examples/, looked up as the API server would."""

    def __init__(self, objects: list[dict]) -> None:
        self.objects = objects

    @classmethod
    def read(cls, paths: list[Path]) -> Objects:
        return cls([obj for path in paths for obj in load_file(path)])

    def replace(self, new: dict) -> Objects:
        """The same objects, with ``new`` instead of the one of its kind and name."""
        return Objects([new if (o["kind"], o["metadata"]["name"]) == (new["kind"], new["metadata"]["name"]) else o
                        for o in self.objects])

    def of_kind(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        for obj in self.of_kind(kind):
            meta = obj["metadata"]
            if meta["name"] == name and meta.get("namespace") == namespace:
                return obj
        return None

    def pail_pvs(self) -> list[dict]:
        return [pv for pv in self.of_kind("PersistentVolume") if pv["spec"].get("csi", {}).get("driver") == DRIVER_NAME]

    def pail_classes(self) -> list[dict]:
        return [sc for sc in self.of_kind("StorageClass") if sc["provisioner"] == DRIVER_NAME]

    def claims_of_class(self, name: str) -> list[dict]:
        return [c for c in self.of_kind("PersistentVolumeClaim") if c["spec"].get("storageClassName") == name]

    def pods_using(self, claim: dict) -> list[tuple[dict, dict]]:
        """(pod, its volume entry) for every pod that mounts ``claim``."""
        found = []
        for pod in self.of_kind("Pod"):
            if pod["metadata"].get("namespace") != claim["metadata"]["namespace"]:
                continue
            for volume in pod["spec"].get("volumes", []):
                if volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]:
                    found.append((pod, volume))
        return found

    def secret_data(self, name: str, namespace: str) -> dict[str, str]:
        secret = self.get("Secret", name, namespace)
        assert secret is not None, f"Secret {namespace}/{name} is referenced but not in examples/"
        # kubelet sends both, decoded; stringData wins.
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return {**data, **(secret.get("stringData") or {})}

    def service_account(self, namespace: str, name: str) -> dict[str, str]:
        """The node server's ServiceAccount lookup, answered from the examples."""
        account = self.get("ServiceAccount", name, namespace)
        if account is None:
            raise CsiError(grpc.StatusCode.PERMISSION_DENIED, f"service account {namespace}/{name} does not exist")
        return dict(account["metadata"].get("annotations") or {})


@pytest.fixture(scope="module")
def examples() -> Objects:
    return Objects.read(_files())


# -- the files and their schemas ---------------------------------------------------------------


def test_examples_are_all_there():
    assert EXPECTED <= {p.name for p in _files()}


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_objects_are_valid_kubernetes(path):
    objects = load_file(path)
    assert objects, f"{path.name} has no objects"
    problems = [f"{describe(obj)}: {error}" for obj in objects if (error := schema_errors(obj))]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_every_example_is_commented(path):
    # The examples are documentation: each object should say why its fields are set.
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should start with a comment saying what it shows"
    for document in re.split(r"^---$", text, flags=re.MULTILINE):
        assert "#" in document, f"{path.name}: an object without a single comment"


def test_names_fit_together(examples):
    """What binds a claim to its volume, a pod to its claim and a volume to its secret
    refers to something that exists in the examples, as Kubernetes needs it."""
    problems = []
    for pv in examples.of_kind("PersistentVolume"):
        spec, name = pv["spec"], pv["metadata"]["name"]
        ref = spec.get("claimRef")
        claim = ref and examples.get("PersistentVolumeClaim", ref["name"], ref["namespace"])
        if not claim:
            problems.append(f"PV {name}: claimRef names no claim of the examples")
            continue
        if claim["spec"].get("volumeName") != name:
            problems.append(f"PV {name}: its claim does not name it in volumeName")
        if spec.get("storageClassName") != "" or claim["spec"].get("storageClassName") != "":
            problems.append(f"PV {name}: static PV and claim need storageClassName \"\"")
        if spec["accessModes"] != claim["spec"]["accessModes"]:
            problems.append(f"PV {name}: access modes differ from its claim's")
        if _bytes(claim["spec"]["resources"]["requests"]["storage"]) > _bytes(spec["capacity"]["storage"]):
            problems.append(f"PV {name}: its claim requests more than its capacity")
        if not examples.pods_using(claim):
            problems.append(f"PV {name}: no pod uses its claim")
        secret = spec["csi"].get("nodePublishSecretRef")
        if secret and not examples.get("Secret", secret["name"], secret["namespace"]):
            problems.append(f"PV {name}: nodePublishSecretRef names no secret of the examples")
    for claim in examples.of_kind("PersistentVolumeClaim"):
        cls = claim["spec"].get("storageClassName")
        if cls and not examples.get("StorageClass", cls):
            problems.append(f"{describe(claim)}: StorageClass {cls} is not in the examples")
    for pod in examples.of_kind("Pod"):
        ns = pod["metadata"]["namespace"]
        account = pod["spec"].get("serviceAccountName")
        if account and not examples.get("ServiceAccount", account, ns):
            problems.append(f"{describe(pod)}: service account {account} is not in the examples")
        for volume in pod["spec"]["volumes"]:
            claim = volume.get("persistentVolumeClaim")
            if claim and not examples.get("PersistentVolumeClaim", claim["claimName"], ns):
                problems.append(f"{describe(pod)}: claim {claim['claimName']} is not in the examples")
    assert not problems, "\n".join(problems)


# -- what the driver accepts -------------------------------------------------------------------


def test_mount_options_pass_the_allowlist(examples):
    users = examples.pail_pvs() + examples.pail_classes()
    assert users
    for obj in users:
        options = obj.get("mountOptions") or obj.get("spec", {}).get("mountOptions") or []
        # raises MountFlagError naming the option; 'cache' takes the node server's directory
        parse_mount_flags(options, cache_dir="/var/cache/pail/0123")


def test_attribute_and_parameter_names_are_the_drivers(examples):
    for pv in examples.pail_pvs():
        unknown = set(pv["spec"]["csi"].get("volumeAttributes", {})) - ctx.VOLUME_ATTRIBUTES
        assert not unknown, f"{describe(pv)}: not volume attributes: {sorted(unknown)}"
    for sc in examples.pail_classes():
        unknown = {k for k in sc.get("parameters", {}) if not k.startswith(ctx.PROVISIONER_PREFIX)} - PARAMETERS
        assert not unknown, f"{describe(sc)}: not StorageClass parameters: {sorted(unknown)}"


@dataclass
class Published:
    spec: MountSpec
    target: str


class RecordingMounts(MountManager):
    """The node's mount manager, minus the mount: it records what it was asked to mount."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.published: list[Published] = []

    def publish(self, spec: MountSpec, target: str) -> bool:
        self.published.append(Published(spec, target))
        return True


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class Context:
    """The part of grpc.ServicerContext the servicers use."""

    def abort(self, code, message):
        raise Refused(code, message)


class NoS3Controller(ControllerService):
    """The controller without its bucket checks: these tests are about the parameters."""

    def _head_bucket(self, bucket: str, region: str) -> None:
        pass

    def _create_bucket(self, bucket: str, region: str) -> None:
        pass


@pytest.fixture
def node(tmp_path, examples):
    mounts = RecordingMounts(tmp_path / "state")
    # As the chart runs it: EKS Pod Identity offered at the agent's default address.
    pod_identity = PodIdentitySettings(pod_identity_agent_url="http://169.254.170.23/v1/credentials")
    service = NodeService("node-1", mounts, kubelet_dir=KUBELET_DIR, service_accounts=examples.service_account,
                          pod_identity=pod_identity)
    yield service, mounts
    mounts.close()  # its launcher, which would otherwise live on as this process's child


@pytest.fixture
def controller():
    # No credentials are looked up: the S3 calls are the part left out.
    session = botocore.session.get_session()
    session.set_config_variable("region", "us-east-1")
    return NoS3Controller(ControllerSettings(), session=session)


def _tokens() -> str:
    """What kubelet projects for the CSIDriver's tokenRequests (sts and Pod Identity)."""
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({audience: {"token": "header.payload.signature", "expirationTimestamp": expires}
                       for audience in ("sts.amazonaws.com", "pods.eks.amazonaws.com")})


def publish_request(volume_id: str, pv_name: str, attributes: dict[str, str], mount_options: list[str],
                    access_modes: list[str], pv_read_only: bool, pod: dict, volume: dict,
                    secrets: dict[str, str]) -> csi_pb2.NodePublishVolumeRequest:
    """NodePublishVolume as kubelet sends it for ``pod``'s ``volume`` (pkg/volume/csi)."""
    meta, spec = pod["metadata"], pod["spec"]
    context = dict(attributes)
    # podInfoOnMount and tokenRequests, as the chart's CSIDriver sets them.
    context.update({
        ctx.POD_NAME: meta["name"], ctx.POD_NAMESPACE: meta["namespace"], ctx.POD_UID: str(uuid.uuid4()),
        ctx.SERVICE_ACCOUNT_NAME: spec.get("serviceAccountName", "default"), ctx.EPHEMERAL: "false",
        ctx.SERVICE_ACCOUNT_TOKENS: _tokens(),
    })
    group = (spec.get("securityContext") or {}).get("fsGroup")
    # kubelet takes the PV's first access mode.
    cap = capability(ACCESS_MODES[access_modes[0]], mount_options, fs_group=str(group) if group is not None else "")
    read_only = pv_read_only or bool(volume["persistentVolumeClaim"].get("readOnly"))
    target = f"{KUBELET_DIR}/pods/{context[ctx.POD_UID]}/volumes/kubernetes.io~csi/{pv_name}/mount"
    return csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=target, volume_capability=cap,
                                            readonly=read_only, volume_context=context, secrets=secrets)


def _publish(node, request) -> MountSpec:
    service, mounts = node
    service.NodePublishVolume(request, Context())
    return mounts.published[-1].spec


def _option(spec: MountSpec, name: str) -> str | None:
    """The value the mount process gets for ``name`` (argparse: the last one wins)."""
    value = None
    for i, arg in enumerate(spec.options):
        if arg == name:
            value = spec.options[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _static_publishes(examples: Objects):
    for pv in examples.pail_pvs():
        spec = pv["spec"]
        claim = examples.get("PersistentVolumeClaim", spec["claimRef"]["name"], spec["claimRef"]["namespace"])
        ref = spec["csi"].get("nodePublishSecretRef")
        secrets = examples.secret_data(ref["name"], ref["namespace"]) if ref else {}
        for pod, volume in examples.pods_using(claim):
            request = publish_request(spec["csi"]["volumeHandle"], pv["metadata"]["name"],
                                      spec["csi"].get("volumeAttributes", {}), spec.get("mountOptions", []),
                                      spec["accessModes"], spec["csi"].get("readOnly", False), pod, volume, secrets)
            yield pv, pod, request


def test_static_volumes_publish(examples, node):
    published = 0
    for pv, pod, request in _static_publishes(examples):
        where = f"{describe(pv)} in {describe(pod)}"
        try:
            spec = _publish(node, request)
        except Refused as exc:
            pytest.fail(f"{where}: NodePublishVolume refused it: {exc}")
        published += 1
        # A handle in the controller's id format would be deleted like a dynamic volume.
        assert decode(pv["spec"]["csi"]["volumeHandle"]) is None, f"{where}: volumeHandle looks like a Pail id"
        attributes = pv["spec"]["csi"]["volumeAttributes"]
        assert spec.bucket == attributes["bucketName"], where
        if "prefix" in attributes:
            assert _option(spec, "--prefix") == attributes["prefix"], where
        _check_mount(where, spec, pv["spec"], pod, request, examples)
    assert published >= 4  # static, pod identity, read-only, secret


def _check_mount(where: str, spec: MountSpec, pv_spec: dict, pod: dict, request, examples: Objects) -> None:
    """What the example's comments promise about the mount it gets."""
    options = set(spec.options)
    if "ReadOnlyMany" in pv_spec["accessModes"] or request.readonly:
        assert "--read-only" in options, f"{where}: should mount read-only"
    context = pod["spec"].get("securityContext") or {}
    if "runAsUser" in context and "--read-only" not in options:
        # A writer must be able to write: the mount's owner or group is the pod's.
        assert (_option(spec, "--uid") == str(context["runAsUser"])
                or (_option(spec, "--gid") in (str(context.get("runAsGroup")), str(context.get("fsGroup")))
                    and (_option(spec, "--dir-mode") or "0755")[2] in "7")), \
            f"{where}: the pod's user cannot write to the mount"
    attributes = request.volume_context
    if attributes.get(ctx.AUTHENTICATION_SOURCE) == ctx.AUTH_SOURCE_POD:
        account = examples.get("ServiceAccount", pod["spec"]["serviceAccountName"], pod["metadata"]["namespace"])
        assert spec.credentials["source"] == credentials.WEB_IDENTITY, where
        assert spec.credentials["role_arn"] == account["metadata"]["annotations"][ROLE_ARN_ANNOTATION], where
    elif request.secrets:
        assert spec.credentials["source"] == credentials.STATIC, where
    else:
        assert spec.credentials is None, f"{where}: should use the node's own credentials"


def _class_claims(examples: Objects, sc: dict) -> list[dict]:
    """The class's claims in the examples, or one like a user would write."""
    return examples.claims_of_class(sc["metadata"]["name"]) or [{
        "metadata": {"name": "claim", "namespace": "default"},
        "spec": {"storageClassName": sc["metadata"]["name"], "accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": "1Gi"}}},
    }]


def _provision(controller, sc: dict, claim: dict) -> tuple[str, csi_pb2.Volume, dict]:
    """CreateVolume as csi-provisioner calls it for ``claim``: (PV name, volume, secret ref)."""
    pv_name = f"pvc-{uuid.uuid4()}"
    ns, name = claim["metadata"]["namespace"], claim["metadata"]["name"]
    params = {k: v for k, v in sc.get("parameters", {}).items()
              # csi-provisioner consumes its own secret keys and never passes them on.
              if not (k.startswith(ctx.PROVISIONER_PREFIX) and "secret" in k)}
    # --extra-create-metadata
    params.update({ctx.PV_NAME: pv_name, ctx.PVC_NAME: name, ctx.PVC_NAMESPACE: ns})
    capabilities = [capability(ACCESS_MODES[mode], sc.get("mountOptions", [])) for mode in claim["spec"]["accessModes"]]
    request = csi_pb2.CreateVolumeRequest(
        name=pv_name, parameters=params, volume_capabilities=capabilities,
        capacity_range=csi_pb2.CapacityRange(required_bytes=_bytes(claim["spec"]["resources"]["requests"]["storage"])))
    volume = controller.CreateVolume(request, Context()).volume
    secret = {}
    raw = sc.get("parameters", {})
    if f"{ctx.PROVISIONER_PREFIX}node-publish-secret-name" in raw:
        def fill(template: str) -> str:
            return (template.replace("${pvc.namespace}", ns).replace("${pvc.name}", name)
                    .replace("${pv.name}", pv_name))
        secret = {"name": fill(raw[f"{ctx.PROVISIONER_PREFIX}node-publish-secret-name"]),
                  "namespace": fill(raw[f"{ctx.PROVISIONER_PREFIX}node-publish-secret-namespace"])}
    return pv_name, volume, secret


def test_storage_classes_provision_and_publish(examples, node, controller):
    classes = examples.pail_classes()
    assert len(classes) >= 3  # prefix per volume, bucket per volume, with a secret
    for sc in classes:
        for claim in _class_claims(examples, sc):
            where = f"{describe(sc)} for {describe(claim)}"
            try:
                pv_name, volume, secret = _provision(controller, sc, claim)
            except Refused as exc:
                pytest.fail(f"{where}: CreateVolume refused it: {exc}")
            secrets = examples.secret_data(secret["name"], secret["namespace"]) if secret else {}
            some_pod = {"metadata": {"name": "pod", "namespace": claim["metadata"]["namespace"]}, "spec": {}}
            pods = examples.pods_using(claim) or [(some_pod, {"persistentVolumeClaim": {}})]
            for pod, pod_volume in pods:
                request = publish_request(volume.volume_id, pv_name, dict(volume.volume_context),
                                          sc.get("mountOptions", []), claim["spec"]["accessModes"], False,
                                          pod, pod_volume, secrets)
                try:
                    spec = _publish(node, request)
                except Refused as exc:
                    pytest.fail(f"{where} in {describe(pod)}: NodePublishVolume refused it: {exc}")
                params = sc["parameters"]
                if params.get("bucketPerVolume") == "true":
                    assert spec.bucket.startswith(params.get("bucketNamePrefix", "pail-")), where
                else:
                    assert spec.bucket == params["bucketName"], where
                    base = params.get("basePrefix", "").strip("/")
                    assert _option(spec, "--prefix") == f"{base}/{pv_name}/".lstrip("/"), where
                _check_mount(where, spec, {"accessModes": claim["spec"]["accessModes"]}, pod, request, examples)


# -- the checks above can fail -------------------------------------------------------------------


@pytest.mark.parametrize("change, expected", [
    (lambda pv: pv["spec"]["csi"]["volumeAttributes"].update(bucketname="x"), "unknown attribute 'bucketname'"),
    (lambda pv: pv["spec"]["mountOptions"].append("endpoint-url=http://elsewhere"), "'endpoint-url'"),
    (lambda pv: pv["spec"]["mountOptions"].append("metadata-ttl=forever"), "--metadata-ttl"),
    (lambda pv: pv["spec"]["csi"]["volumeAttributes"].update(authenticationSource="pod"), "secret"),
], ids=["attribute typo", "refused option", "bad value", "pod identity with a secret"])
def test_a_wrong_volume_would_fail(examples, node, change, expected):
    """The publish check is not vacuous: mistakes like these are refused."""
    pv = copy.deepcopy(examples.get("PersistentVolume", "s3-with-keys"))
    change(pv)
    (_, _, request), = [r for r in _static_publishes(examples.replace(pv)) if r[0] is pv]
    with pytest.raises(Refused, match=re.escape(expected)) as refused:
        _publish(node, request)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("change, expected", [
    (lambda sc: sc["parameters"].update(basePrefx="x"), "unknown parameter 'basePrefx'"),
    (lambda sc: sc["parameters"].update(endpoint="http://elsewhere"), "'endpoint' cannot be set"),
    (lambda sc: sc["mountOptions"].append("prefix=shared/"), "mount option 'prefix'"),
    (lambda sc: sc["parameters"].update(bucketPerVolume="yes"), "expected 'true' or 'false'"),
], ids=["parameter typo", "endpoint", "prefix mount option", "bad boolean"])
def test_a_wrong_storage_class_would_fail(examples, controller, change, expected):
    sc = copy.deepcopy(examples.get("StorageClass", "s3-scratch"))
    change(sc)
    with pytest.raises(Refused, match=re.escape(expected)) as refused:
        _provision(controller, sc, examples.claims_of_class("s3-scratch")[0])
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity)).groups()
    return int(number) * SIZE_UNITS[unit]


# -- one example, really mounted ------------------------------------------------------------------


@pytest.mark.s3_servers("moto")
def test_static_example_mounts_for_real(examples, s3_server, bucket, tmp_path):
    """The static PV, published through the node server's socket as kubelet would, against
    a local S3 server: only the bucket, endpoint and region are swapped for the test's."""
    pv = examples.get("PersistentVolume", "s3-static")
    spec = pv["spec"]
    attributes = {**spec["csi"]["volumeAttributes"], "bucketName": bucket, "endpoint": s3_server.endpoint,
                  "region": "us-east-1"}
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key=f"{attributes['prefix']}existing.txt", Body=b"from S3\n")
    server = NodeServer(root=tmp_path / "node", env=s3_server.env()).start()
    try:
        kubelet = Kubelet(server)
        pod = Pod(uid=str(uuid.uuid4()), name="s3-static-app")
        target = kubelet.publish(pod, pv["metadata"]["name"], attributes, volume_id=spec["csi"]["volumeHandle"],
                                 cap=capability(ACCESS_MODES[spec["accessModes"][0]], flags=spec["mountOptions"]))
        try:
            assert (target / "existing.txt").read_bytes() == b"from S3\n"
            info = target.stat()
            assert (info.st_uid, info.st_gid) == (1000, 1000)  # the uid/gid mount options
            (target / "hello.txt").write_bytes(b"hello\n")
            assert s3.get_object(Bucket=bucket, Key=f"{attributes['prefix']}hello.txt")["Body"].read() == b"hello\n"
            (target / "hello.txt").unlink()  # allow-delete
            assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=f"{attributes['prefix']}hello")
        finally:
            kubelet.unpublish(pod, pv["metadata"]["name"], volume_id=spec["csi"]["volumeHandle"])
    finally:
        server.stop()
