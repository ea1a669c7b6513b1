"""A Keystone v3 token answer for failure-injection tests with ``responses``."""

from __future__ import annotations

FAKE_AUTH = "https://keystone.invalid/v3"
FAKE_STORAGE = "https://swift.invalid/v1/AUTH_0123"


def token_body(storage_url: str = FAKE_STORAGE) -> dict:
    """Returns the body of POST /v3/auth/tokens: project 0123, one object-store endpoint."""
    return {
        "token": {
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "methods": ["password"],
            "user": {"id": "u", "name": "u", "domain": {"id": "default"}},
            "project": {"id": "0123", "name": "p", "domain": {"id": "default"}},
            "roles": [{"id": "r", "name": "member"}],
            "catalog": [
                {
                    "type": "object-store",
                    "name": "swift",
                    "endpoints": [
                        {"interface": "public", "region": "RegionOne", "url": storage_url}
                    ],
                }
            ],
        }
    }
