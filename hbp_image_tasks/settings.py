"""Swift credentials: load the JSON settings file, check it is private, validate it.

The file holds a service account's password, so it is refused unless only its
owner can read it, and the password is wrapped so that no repr or log shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import SettingsError

logger = logging.getLogger(__name__)

SETTINGS_ENVIRONMENT_VARIABLE = "SWIFT_SETTINGS"
AUTH_VERSIONS = ("1", "3")


class Secret:
    """A string that shows as ``***`` in every repr, str and format."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """Returns the secret itself: pass it only to the authentication library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self):  # never pickled in clear by accident
        raise TypeError("a Secret cannot be pickled")


@dataclasses.dataclass(frozen=True)
class SwiftSettings:
    """Validated Swift credentials; ``os_password`` never shows in a repr."""

    os_username: str
    os_password: Secret
    os_auth_url: str
    auth_version: str = "3"
    os_project_id: str | None = None
    os_project_name: str | None = None
    os_storage_url: str | None = None
    os_user_domain_name: str = "Default"
    os_project_domain_name: str = "Default"
    os_region_name: str | None = None
    source: str = "<settings>"

    def __post_init__(self) -> None:
        where = self.source
        if self.auth_version not in AUTH_VERSIONS:
            raise SettingsError(
                f"{where}: auth_version {self.auth_version!r} is not supported "
                f'(use "3" for Keystone v3, or "1" for tempauth)'
            )
        for key in ("os_username", "os_auth_url"):
            if not getattr(self, key):
                raise SettingsError(f"{where}: required key {key!r} is empty")
        if not self.os_password.reveal():
            raise SettingsError(f"{where}: required key 'os_password' is empty")
        if self.auth_version == "3" and not self.os_project_id and not self.os_project_name:
            raise SettingsError(
                f"{where}: Keystone v3 needs 'os_project_id' "
                f"(or 'os_project_name' with 'os_project_domain_name')"
            )
        for key in ("os_auth_url", "os_storage_url"):
            value = getattr(self, key)
            if value is not None:
                parsed = urlparse(value)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise SettingsError(f"{where}: {key} {value!r} is not an http(s) URL")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<settings>") -> SwiftSettings:
        """Builds settings from the JSON keys of ``.os_settings.example``."""
        if not isinstance(data, Mapping):
            raise SettingsError(
                f"{source}: expected a JSON object with the keys of .os_settings.example"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("%s: ignoring unknown key(s): %s", source, ", ".join(unknown))
        values: dict[str, Any] = {"source": source}
        for key in known:
            if key not in data or data[key] is None:
                continue
            value = data[key]
            if key == "auth_version" and isinstance(value, (int, float)):
                value = str(int(value))
            if not isinstance(value, str):
                raise SettingsError(f"{source}: {key} must be a string, not {type(value).__name__}")
            values[key] = value
        for key in ("os_username", "os_password", "os_auth_url"):
            if key not in values:
                raise SettingsError(f"{source}: required key {key!r} is missing")
        values["os_password"] = Secret(values["os_password"])
        return cls(**values)


def settings_path(option: str | os.PathLike | None) -> Path | None:
    """Returns the settings file to use: the option, else ``$SWIFT_SETTINGS``."""
    if option:
        return Path(option)
    value = os.environ.get(SETTINGS_ENVIRONMENT_VARIABLE)
    return Path(value) if value else None


def check_private(path: Path) -> None:
    """Refuses a file that others may read or write, or that another user owns."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SettingsError(f"settings file {path} is not a regular file")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise SettingsError(
            f"settings file {path} is owned by uid {info.st_uid}, not by the "
            f"user running this command (uid {os.geteuid()}): refusing to use "
            f"another user's credentials"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SettingsError(
            f"settings file {path} has mode {mode:04o}: it holds a password and "
            f"must be private to its owner (run: chmod 600 {path})"
        )


def load_settings(path: str | os.PathLike) -> SwiftSettings:
    """Reads, checks and validates the settings file at ``path``."""
    path = Path(path)
    check_private(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg holds no file content, so no secret can leak through it.
        raise SettingsError(
            f"settings file {path} is not valid JSON: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}"
        ) from None
    return SwiftSettings.from_mapping(data, source=str(path))


def load_settings_from(
    option: str | os.PathLike | None, required: bool = True
) -> SwiftSettings | None:
    """Loads the settings named by ``--settings`` or ``$SWIFT_SETTINGS``."""
    path = settings_path(option)
    if path is None:
        if required:
            raise SettingsError(
                f"no Swift settings: set {SETTINGS_ENVIRONMENT_VARIABLE}=FILE or "
                f"pass --settings FILE (see .os_settings.example)"
            )
        return None
    return load_settings(path)


def add_settings_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, purpose: str = "to upload"
) -> None:
    """Adds ``--settings FILE`` (the option wins over ``$SWIFT_SETTINGS``)."""
    parser.add_argument(
        "--settings",
        metavar="FILE",
        default=None,
        help=f"JSON file with the Swift credentials {purpose} (keys as in "
        f".os_settings.example; must be chmod 600). Default: the file "
        f"named by ${SETTINGS_ENVIRONMENT_VARIABLE}",
    )
