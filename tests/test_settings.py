"""Settings file checks: private file, valid JSON, known keys and values."""

from __future__ import annotations

import json
import logging
import os

import pytest

from hbp_image_tasks.errors import SettingsError
from hbp_image_tasks.settings import load_settings

GOOD = {
    "auth_version": "3",
    "os_username": "u",
    "os_password": "pw-secret",
    "os_project_id": "p",
    "os_auth_url": "https://keystone.example.org/v3",
    "os_storage_url": "https://object.example.org/v1/AUTH_p",
}


def write(tmp_path, data, mode=0o600, text=None):
    path = tmp_path / "settings.json"
    path.write_text(text if text is not None else json.dumps(data))
    os.chmod(path, mode)
    return path


def test_good_file_loads_and_hides_the_password(tmp_path):
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.os_password.reveal() == "pw-secret"
    assert "pw-secret" not in repr(settings)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_by_others_is_refused(tmp_path, mode):
    with pytest.raises(SettingsError, match=f"mode {mode:04o}.*chmod 600"):
        load_settings(write(tmp_path, GOOD, mode))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_file_of_another_user_is_refused(tmp_path):
    path = write(tmp_path, GOOD)
    os.chown(path, 65534, 65534)
    with pytest.raises(SettingsError, match="owned by uid 65534"):
        load_settings(path)


def test_bad_json_names_line_and_column(tmp_path):
    with pytest.raises(SettingsError, match="line 2 column") as caught:
        load_settings(write(tmp_path, None, text='{"os_username": "u",\n  oops}'))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key", ["os_username", "os_password", "os_auth_url"])
def test_missing_key_is_named(tmp_path, key):
    data = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(SettingsError, match=key):
        load_settings(write(tmp_path, data))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("auth_version", "2", "auth_version '2' is not supported"),
        ("os_auth_url", "ftp://keystone.example.org/v3", "not an http"),
        ("os_storage_url", "object.example.org/v1/AUTH_p", "not an http"),
    ],
)
def test_bad_value_is_refused(tmp_path, key, value, message):
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings(write(tmp_path, {**GOOD, key: value}))
    assert "pw-secret" not in str(caught.value)


def test_unknown_key_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_settings(write(tmp_path, {**GOOD, "os_tenant": "x"}))
    assert "os_tenant" in caplog.text
