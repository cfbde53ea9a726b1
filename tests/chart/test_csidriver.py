"""The CSIDriver object: what kubelet does for Pail volumes."""

from __future__ import annotations

from driver.csi.identity import DRIVER_NAME
from driver.csi.volume_credentials import POD_IDENTITY_AUDIENCE, STS_AUDIENCE


def test_csidriver(defaults):
    spec = defaults.one("CSIDriver", DRIVER_NAME)["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["requiresRepublish"] is True
    assert spec["fsGroupPolicy"] == "None"
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    # Exactly the audiences the node server exchanges for pod-level credentials.
    assert [t["audience"] for t in spec["tokenRequests"]] == [STS_AUDIENCE, POD_IDENTITY_AUDIENCE]
    assert all("expirationSeconds" not in t for t in spec["tokenRequests"])
