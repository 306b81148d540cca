"""Tests of workers.matchers: parsing Alertmanager-style matchers and matching labels."""

from __future__ import annotations

import pytest

from workers.matchers import matches_all, parse_matcher


@pytest.mark.parametrize(
    ("text", "name", "op", "value"),
    [
        ('job="web"', "job", "=", "web"),
        ("job=web", "job", "=", "web"),
        ('job!="web"', "job", "!=", "web"),
        ("job!=web", "job", "!=", "web"),
        ('job=~"web|api"', "job", "=~", "web|api"),
        ("job=~web|api", "job", "=~", "web|api"),
        ('job!~"web.*"', "job", "!~", "web.*"),
        ("job!~web.*", "job", "!~", "web.*"),
        ('  job = "web"  ', "job", "=", "web"),
        ('job=""', "job", "=", ""),
        ("job=", "job", "=", ""),
        ('msg="two words"', "msg", "=", "two words"),
    ],
)
def test_parses_each_operator_quoted_and_unquoted(
    text: str, name: str, op: str, value: str
) -> None:
    matcher = parse_matcher(text)

    assert (matcher.name, matcher.op, matcher.value) == (name, op, value)


def test_escaped_quotes_are_part_of_the_value() -> None:
    matcher = parse_matcher(r'msg="say \"hi\""')

    assert matcher.value == 'say "hi"'
    assert matcher.matches({"msg": 'say "hi"'})


def test_escaped_backslash_is_one_backslash() -> None:
    matcher = parse_matcher(r'path="C:\\temp"')

    assert matcher.value == "C:\\temp"


def test_equality_and_inequality() -> None:
    equal, unequal = parse_matcher('job="web"'), parse_matcher('job!="web"')

    assert equal.matches({"job": "web"})
    assert not equal.matches({"job": "webserver"})
    assert not unequal.matches({"job": "web"})
    assert unequal.matches({"job": "api"})


@pytest.mark.parametrize("actual", ["webserver", "myweb", "a-web-b"])
def test_regexes_are_anchored_at_both_ends(actual: str) -> None:
    assert not parse_matcher('job=~"web"').matches({"job": actual})
    assert parse_matcher('job!~"web"').matches({"job": actual})


def test_anchoring_covers_every_alternative() -> None:
    matcher = parse_matcher('job=~"web|api"')

    assert matcher.matches({"job": "web"})
    assert matcher.matches({"job": "api"})
    assert not matcher.matches({"job": "webapi"})
    assert not matcher.matches({"job": "xapi"})


def test_negative_regex() -> None:
    matcher = parse_matcher('env!~"prod|staging"')

    assert not matcher.matches({"env": "prod"})
    assert matcher.matches({"env": "production"})


def test_a_missing_label_matches_as_the_empty_string() -> None:
    assert parse_matcher('job=""').matches({})
    assert not parse_matcher('job!=""').matches({})
    assert not parse_matcher('job="web"').matches({})
    assert parse_matcher('job!="web"').matches({})
    assert parse_matcher('job=~".*"').matches({})
    assert not parse_matcher('job=~".+"').matches({})
    assert parse_matcher('job!~".+"').matches({})


def test_backslash_escapes_in_a_quoted_regex_reach_the_regex() -> None:
    # Alertmanager keeps an escape it does not know (`\.`, `\d`) as written, so the regex gets it.
    dotted = parse_matcher(r'instance=~"web\.example\.com"')
    digits = parse_matcher(r'instance=~"host\d+"')

    assert dotted.matches({"instance": "web.example.com"})
    assert not dotted.matches({"instance": "webxexample.com"})
    assert digits.matches({"instance": "host12"})
    assert not digits.matches({"instance": "hostx"})


def test_matches_all_needs_every_matcher() -> None:
    matchers = [parse_matcher('alertname="ServiceDown"'), parse_matcher('env=~"prod|staging"')]

    assert matches_all(matchers, {"alertname": "ServiceDown", "env": "prod"})
    assert not matches_all(matchers, {"alertname": "ServiceDown", "env": "dev"})
    assert not matches_all(matchers, {"env": "prod"})
    assert matches_all([], {})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("job", "not a label matcher"),
        ('job~"web"', "not a label matcher"),
        ('="web"', "not a label matcher"),
        ('1job="web"', "not a label matcher"),
        ("", "not a label matcher"),
        ('job=~"("', "bad regular expression"),
        ("job!~[a-", "bad regular expression"),
        ('job="web', "unbalanced quotes"),
        ('job=web"', "unbalanced quotes"),
        ('job="', "unbalanced quotes"),
        ('job="a"b"', "bad quoted value"),
    ],
)
def test_bad_matchers_raise_value_error_naming_the_text(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_matcher(text)

    assert reason in str(raised.value)
    assert text in str(raised.value)
