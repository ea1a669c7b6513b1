"""Object names: the literal prefix of a --filter regex, the checks that keep every
selected object inside the destination directory, and names under a prefix.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from .errors import InputError, UsageError
from .layout import FETCH_MANIFEST_NAME
from .swift import ObjectInfo

_REGEX_META = set(".^$*+?{}[]\\|()")
_OPTIONAL_QUANTIFIERS = set("*?{")


def _has_top_level_alternation(pattern: str) -> bool:
    """Returns True if a ``|`` outside groups and classes splits ``pattern``."""
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "]" or pattern[i + 1 : i + 3] == "^]":
                i += 2 if pattern[i + 1] == "]" else 3  # a leading ] is literal
                continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
        i += 1
    return False


def literal_prefix(pattern: str) -> str:
    """Returns the literal text every full match of ``pattern`` starts with.

    Stops at the first metacharacter; a last literal character that a
    following ``?``, ``*`` or ``{`` quantifier applies to is left out, and an
    alternation at the top level gives no prefix at all.
    """
    compiled = re.compile(pattern)
    if _has_top_level_alternation(pattern) or compiled.flags & (re.IGNORECASE | re.VERBOSE):
        return ""
    prefix: list[str] = []
    i = 1 if pattern.startswith("^") else 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum():
                break  # \d, \w, \A...: a class or an anchor, not a literal
            literal, step = pattern[i + 1], 2
        elif char in _REGEX_META:
            break
        else:
            literal, step = char, 1
        i += step
        if i < len(pattern) and pattern[i] in _OPTIONAL_QUANTIFIERS:
            break
        prefix.append(literal)
    return "".join(prefix)


def join_prefix(prefix: str, name: str) -> str:
    """Returns the object name of ``name`` under ``prefix``: ``prefix/name``, or ``name``."""
    return f"{prefix}/{name}" if prefix else name


def listing_prefix(prefix: str) -> str:
    """Returns what a listing of the objects under ``prefix`` asks for (``prefix/``, or all)."""
    return f"{prefix}/" if prefix else ""


def compile_filter(filter_regex: str | None) -> re.Pattern[str] | None:
    """Returns the compiled ``--filter``, or raises UsageError naming the problem."""
    if filter_regex is None:
        return None
    try:
        return re.compile(filter_regex)
    except re.error as exc:
        raise UsageError(
            f"--filter {filter_regex!r} is not a valid regular expression: {exc}"
        ) from None


def check_object_name(name: str) -> PurePosixPath:
    """Returns ``name`` as a relative path, or raises InputError if unsafe."""
    problem = None
    if not name:
        problem = "it is empty"
    elif "\0" in name:
        problem = "it contains a NUL character"
    elif name.startswith("/"):
        problem = "it is an absolute path"
    else:
        parts = name.split("/")
        if any(part in ("..", ".") for part in parts):
            problem = "it contains a '.' or '..' component"
        elif any(not part for part in parts):
            problem = "it contains an empty path component ('//' or a trailing '/')"
    if problem:
        raise InputError(f"object name {name!r} cannot be written under the destination: {problem}")
    return PurePosixPath(name)


def is_directory_marker(info: ObjectInfo) -> bool:
    """Returns True for a pseudo-directory marker (``dir/`` or application/directory)."""
    return info.name.endswith("/") or (
        info.bytes == 0 and info.content_type.startswith("application/directory")
    )


def check_layout(objects: list[ObjectInfo]) -> None:
    """Refuses selections whose local paths would collide with each other."""
    names = {info.name for info in objects}
    for info in objects:
        parents = info.name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            parent = "/".join(parents[:depth])
            if parent in names:
                raise InputError(
                    f"objects {parent!r} and {info.name!r} cannot both be "
                    f"written: {parent!r} would be a file and a directory"
                )
    if FETCH_MANIFEST_NAME in names:
        raise InputError(
            f"object {FETCH_MANIFEST_NAME!r} would be overwritten by the fetch manifest "
            "of the same name"
        )
