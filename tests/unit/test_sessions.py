"""The botocore session a mount makes its clients from (driver.credentials.session)."""

from __future__ import annotations

import botocore.exceptions
import pytest

from driver import credentials


@pytest.fixture(autouse=True)
def no_aws_files(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_DATA_PATH", raising=False)


@pytest.mark.parametrize("service", credentials.SERVICES)
def test_the_session_makes_every_client_pail_uses(service):
    client = credentials.session(None).create_client(service, region_name="us-east-1")
    try:
        assert client.meta.service_model.service_name == service
    finally:
        client.close()


def test_a_service_pail_does_not_use_is_not_looked_for():
    # What the session is spared: listing every service botocore ships.
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        credentials.session(None).create_client("dynamodb", region_name="us-east-1")


def test_models_are_looked_for_in_aws_data_path_first(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    loader = credentials.session(None).get_component("data_loader")
    assert loader.search_paths[0] == str(tmp_path)
