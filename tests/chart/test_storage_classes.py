"""StorageClasses from values: rendered as given and accepted by the driver's own checks."""

from __future__ import annotations

import pytest

from driver.csi.controller import ControllerService, ControllerSettings
from driver.csi.identity import DRIVER_NAME
from driver.csi.mount_flags import parse_mount_flags
from tests.chart import helm as h

DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


def test_no_storage_class_by_default(defaults):
    assert not defaults.of_kind("StorageClass")


def test_storage_classes_rendered(rendered):
    r = rendered("storage-classes.yaml")
    scratch = r.one("StorageClass", "s3-scratch")
    assert scratch["provisioner"] == DRIVER_NAME
    assert scratch["parameters"] == {"bucketName": "data-lake", "basePrefix": "volumes/scratch",
                                     "deletePolicy": "retain", "region": "eu-west-1"}
    assert scratch["mountOptions"] == ["allow-delete", "uid=1000", "metadata-ttl=60"]
    assert (scratch["reclaimPolicy"], scratch["volumeBindingMode"]) == ("Delete", "Immediate")
    assert scratch["metadata"]["annotations"] == {DEFAULT_CLASS: "true"}
    assert scratch["allowVolumeExpansion"] is False

    each = r.one("StorageClass", "s3-bucket-each")
    assert each["parameters"] == {
        "bucketPerVolume": "true", "bucketNamePrefix": "acme-pail-", "deletePolicy": "delete",
        "csi.storage.k8s.io/node-publish-secret-name": "s3-keys",
        "csi.storage.k8s.io/node-publish-secret-namespace": "${pvc.namespace}"}
    assert (each["reclaimPolicy"], each["volumeBindingMode"]) == ("Retain", "WaitForFirstConsumer")
    assert each["metadata"]["annotations"] == {"team": "storage"}
    assert each["metadata"]["labels"]["tier"] == "bulk"


@pytest.mark.parametrize("name", ["s3-scratch", "s3-bucket-each"])
def test_driver_accepts_rendered_storage_classes(rendered, name):
    """What the controller will do with the first PVC: plan the volume from the class's
    parameters (no S3 request), and what the node will do: turn mountOptions into
    `pail mount` options. Both refuse anything they do not know."""
    sc = rendered("storage-classes.yaml").one("StorageClass", name)
    service = ControllerService(ControllerSettings(region="us-east-1"))
    ref, _, _ = service._plan("pvc-0b9e1c2d-3f4a-4b5c-8d6e-7f8091a2b3c4", dict(sc["parameters"]))
    assert ref.bucket
    parse_mount_flags(sc["mountOptions"])


def test_string_parameters_survive_rendering(helm):
    """Values that YAML would turn into booleans or numbers stay strings in the class."""
    r = h.render(None, "--set", "storageClasses[0].name=a",
                 "--set-string", "storageClasses[0].parameters.forcePathStyle=true",
                 "--set-string", "storageClasses[0].parameters.bucketName=123")
    assert r.one("StorageClass", "a")["parameters"] == {"forcePathStyle": "true", "bucketName": "123"}
