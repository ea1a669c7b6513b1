"""Object names: the listing prefix of a --filter, safe local paths, names under a prefix."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pytest

from hbp_image_tasks.errors import InputError, UsageError
from hbp_image_tasks.layout import FETCH_MANIFEST_NAME
from hbp_image_tasks.object_names import (
    check_layout,
    check_object_name,
    compile_filter,
    is_directory_marker,
    join_prefix,
    listing_prefix,
    literal_prefix,
)
from hbp_image_tasks.swift import ObjectInfo


@pytest.mark.parametrize(
    "pattern, prefix",
    [
        (r"data/raw/original/pm31\d{2}o.png", "data/raw/original/pm31"),
        (r"^stack/s\d+\.tif", "stack/s"),
        (r"a\.b/c", "a.b/c"),  # an escaped metacharacter is a literal
        (r"sections/s1?", "sections/s"),  # a letter made optional is left out
        (r"ab*c", "a"),
        (r"ab{0,2}", "a"),
        (r"x(y|z)", "x"),  # alternation inside a group ends the prefix there
        (r"a[|]b", "a"),  # a '|' in a class is no alternation
        (r"left|right", ""),  # top-level alternation: no common start
        (r"(?i)Stack/s1", ""),  # case-insensitive: the listing would miss names
        (r"[ab]c", ""),
        (r"\w+", ""),
    ],
)
def test_literal_prefix_is_what_every_full_match_starts_with(pattern, prefix):
    assert literal_prefix(pattern) == prefix


@pytest.mark.parametrize(
    "pattern, names",
    [
        (r"data/pm31\d{2}o.png", ["data/pm3100o.png", "data/pm3199o.png"]),
        (r"sections/s1?", ["sections/s", "sections/s1"]),
        (r"ab{0,2}", ["a", "ab", "abb"]),
        (r"x(y|z)", ["xy", "xz"]),
    ],
)
def test_names_matching_the_filter_are_inside_the_listing_prefix(pattern, names):
    prefix = literal_prefix(pattern)
    for name in names:
        assert re.fullmatch(pattern, name) and name.startswith(prefix)


def test_compile_filter_refuses_a_bad_regex_naming_it():
    assert compile_filter(None) is None
    assert compile_filter(r"a\d").fullmatch("a1")
    with pytest.raises(UsageError, match=r"--filter 'a\(' is not a valid regular expression"):
        compile_filter("a(")


@pytest.mark.parametrize("name", ["a.png", "dir/sub/a.png", "..hidden/x", "a..b"])
def test_safe_object_name_becomes_a_relative_path(name):
    assert check_object_name(name) == PurePosixPath(name)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "it is empty"),
        ("a\0b", "NUL"),
        ("/etc/passwd", "absolute path"),
        ("a/../../b", "'..' component"),
        ("./a", "'.' or '..' component"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
    ],
)
def test_unsafe_object_name_is_refused_with_the_reason(name, reason):
    with pytest.raises(InputError, match="cannot be written under the destination") as caught:
        check_object_name(name)
    assert reason in str(caught.value) and repr(name) in str(caught.value)


@pytest.mark.parametrize(
    "info, marker",
    [
        (ObjectInfo("dir/", 0, ""), True),
        (ObjectInfo("dir", 0, "", content_type="application/directory"), True),
        (ObjectInfo("dir", 5, "", content_type="application/directory"), False),
        (ObjectInfo("empty.txt", 0, "", content_type="text/plain"), False),
        (ObjectInfo("a.png", 10, "", content_type="image/png"), False),
    ],
)
def test_pseudo_directory_markers_are_recognised(info, marker):
    assert is_directory_marker(info) is marker


def test_layout_refuses_a_name_that_is_also_a_directory():
    objects = [ObjectInfo("a/b", 1, ""), ObjectInfo("a/b/c.png", 1, "")]
    with pytest.raises(InputError, match="'a/b' would be a file and a directory"):
        check_layout(objects)


def test_layout_refuses_an_object_named_like_the_fetch_manifest():
    with pytest.raises(InputError, match=FETCH_MANIFEST_NAME):
        check_layout([ObjectInfo(FETCH_MANIFEST_NAME, 1, ""), ObjectInfo("a.png", 1, "")])


def test_layout_accepts_siblings_and_nested_files():
    check_layout([ObjectInfo(n, 1, "") for n in ("a/b.png", "a/c/d.png", "ab", "a.png")])


@pytest.mark.parametrize(
    "prefix, name, joined, listed",
    [
        ("", "info", "info", ""),
        ("2015/8um", "info", "2015/8um/info", "2015/8um/"),
        ("p", "1mm/0-64_0-64_0-64", "p/1mm/0-64_0-64_0-64", "p/"),
    ],
)
def test_names_under_a_prefix(prefix, name, joined, listed):
    assert join_prefix(prefix, name) == joined
    assert listing_prefix(prefix) == listed
    assert join_prefix(prefix, name).startswith(listing_prefix(prefix))
