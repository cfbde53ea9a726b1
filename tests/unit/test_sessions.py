"""The botocore session a mount makes its clients from (driver.credentials.session)."""

from __future__ import annotations

import botocore.exceptions
import botocore.loaders
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


@pytest.mark.parametrize("service", credentials.SERVICES)
def test_once_the_models_are_loaded_a_new_session_reads_no_model_file(service, monkeypatch):
    # What the node server's launcher does before it forks mount processes.
    monkeypatch.setattr(credentials, "_loaders", {})  # none loaded by the tests before
    credentials.load_models()
    parsed: list[str] = []  # model files read and parsed (looking for an absent one costs a stat)
    original = botocore.loaders.JSONFileLoader.load_file

    def load_file(self, path):
        data = original(self, path)
        if data is not None:
            parsed.append(path)
        return data

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", load_file)
    client = credentials.session(None).create_client(
        service, region_name="eu-west-1", endpoint_url="http://127.0.0.1:9", aws_access_key_id="id",
        aws_secret_access_key="secret")
    try:
        assert parsed == []
    finally:
        client.close()


def test_sessions_share_a_loader_only_with_the_same_search_paths(monkeypatch, tmp_path):
    first = credentials.new_session().get_component("data_loader")
    assert credentials.new_session().get_component("data_loader") is first
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    other = credentials.new_session().get_component("data_loader")
    assert other is not first and other.search_paths[0] == str(tmp_path)
