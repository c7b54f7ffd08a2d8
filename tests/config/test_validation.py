"""Translation of pydantic errors: key paths, codes, merged branches, hints."""

from __future__ import annotations

import datetime

import pytest

from pgproxy.config.diagnostics import Diagnostic, Severity
from pgproxy.config.loader import parse_config
from pgproxy.config.validation import describe_value
from pgproxy.errors import ConfigError

HEAD = '[listeners.public]\naddress = "127.0.0.1:8080"\n'


def errors_of(text: str) -> list[Diagnostic]:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + text, "t.toml")
    return caught.value.diagnostics


def only_error(text: str) -> Diagnostic:
    [error] = errors_of(text)
    return error


def test_unknown_key_suggests_close_field() -> None:
    error = only_error('[clusters.api]\nendpoints = ["a:1"]\nconect_timeout = "1s"\n')

    assert error.code == "unknown-key"
    assert error.key == "clusters.api.conect_timeout"
    assert error.message == 'unknown key "conect_timeout"'
    assert error.hint == 'did you mean "connect_timeout"?'
    assert error.severity is Severity.ERROR


def test_unknown_key_without_close_match_lists_fields() -> None:
    error = only_error('[clusters.api]\nendpoints = ["a:1"]\nflavour = 1\n')

    assert error.hint is not None
    assert error.hint.startswith("valid keys here: endpoints, balancer, hash_key")


def test_misspelt_required_key_reports_once() -> None:
    error = only_error('[clusters.api]\nendpont = ["a:1"]\n')

    assert error.code == "unknown-key"
    assert error.hint == 'did you mean "endpoints"?'


def test_missing_key_points_at_table() -> None:
    error = only_error("[clusters.api]\nbalancer = 'random'\n")

    assert error.code == "missing-key"
    assert error.key == "clusters.api.endpoints"
    assert (error.line, error.column) == (3, 1)
    assert error.source_line == "[clusters.api]"
    assert error.hint is not None and error.hint.startswith("endpoints: ")


def test_string_endpoint_error_has_one_diagnostic() -> None:
    error = only_error('[clusters.api]\nendpoints = ["a:1", "b"]\n')

    assert error.code == "invalid-value"
    assert error.key == "clusters.api.endpoints[1]"
    assert error.message == 'invalid address "b": expected "host:port" or "[v6]:port"'


def test_table_endpoint_errors_come_from_table_form() -> None:
    errors = errors_of("[clusters.api]\nendpoints = [{ address = 5, weight = 2000 }]\n")

    assert [(e.key, e.code) for e in errors] == [
        ("clusters.api.endpoints[0].address", "invalid-type"),
        ("clusters.api.endpoints[0].weight", "invalid-value"),
    ]
    assert errors[1].message == "invalid weight 2000: must be at most 1000"


def test_endpoint_of_no_form_merges_branches() -> None:
    error = only_error("[clusters.api]\nendpoints = [true]\n")

    assert error.code == "invalid-type"
    assert (
        error.message == "invalid type: expected a string or a table, got boolean true"
    )


def test_scalar_union_keeps_the_real_error() -> None:
    error = only_error("[server]\nworkers = 1000\n")

    assert error.code == "invalid-value"
    assert error.message == 'invalid workers 1000: expected 1-256 or "auto"'


def test_literal_suggests_close_choice() -> None:
    error = only_error("[server]\naccess_log = 'jsn'\n")

    assert error.message == (
        'invalid access_log "jsn": expected one of "json", "combined" or "off"'
    )
    assert error.hint == 'did you mean "json"?'


def test_literal_of_mixed_types() -> None:
    error = only_error("[[routes]]\nrespond = {}\nretry_on = [500]\n")

    assert error.key == "routes[0].retry_on[0]"
    assert error.message.startswith(
        'invalid value 500: expected one of "connect-failure"'
    )


def test_value_position_for_invalid_value() -> None:
    error = only_error('[server]\ndrain_timeout   =   "soon"\n')

    assert (error.line, error.column) == (4, 21)


def test_bad_listener_name_points_at_header() -> None:
    error = only_error('[listeners._x]\naddress = "127.0.0.1:1"\n')

    assert error.key == "listeners._x"
    assert error.code == "invalid-value"
    assert (error.line, error.column) == (3, 1)


def test_model_check_names_its_key() -> None:
    error = only_error('[[routes]]\ncluster = "a"\nrespond.status = 200\n')

    assert error.code == "conflicting-keys"
    assert error.key == "routes[0].respond"
    assert (error.line, error.column) == (5, 1)


def test_named_table_hint() -> None:
    error = only_error("[clusters]\nendpoints = ['a:1']\n")

    assert error.key == "clusters.endpoints"
    assert error.hint == "entries of clusters are named tables, such as [clusters.NAME]"


def test_strict_types_reject_coercion() -> None:
    errors = errors_of("[[routes]]\nrespond = { status = '200' }\npriority = 1.0\n")

    assert [(e.key, e.code) for e in errors] == [
        ("routes[0].respond.status", "invalid-type"),
        ("routes[0].priority", "invalid-type"),
    ]


def test_datetime_value_is_described() -> None:
    error = only_error("[server]\nadmin = 2024-01-01T00:00:00Z\n")

    assert error.message == (
        "invalid type: expected a string, got date-time 2024-01-01T00:00:00+00:00"
    )


@pytest.mark.parametrize(
    ("line", "expected", "got"),
    [
        (
            "drain_timeout = false",
            'a string with a unit, such as "250ms"',
            "boolean false",
        ),
        ("drain_timeout = 5", 'a string with a unit, such as "250ms"', "integer 5"),
        (
            "drain_timeout = 2024-01-01",
            'a string with a unit, such as "250ms"',
            "date-time 2024-01-01",
        ),
        ("drain_timeout = [1]", 'a string with a unit, such as "250ms"', "an array"),
    ],
)
def test_duration_of_other_type(line: str, expected: str, got: str) -> None:
    error = only_error(f"[server]\n{line}\n")

    assert error.code == "invalid-type"
    assert error.message.startswith(f"invalid type: expected {expected}")
    assert error.message.endswith(f", got {got}")


@pytest.mark.parametrize(
    ("value", "got"),
    [("true", "boolean true"), ("1.5", "float 1.5"), ("{ a = 1 }", "a table")],
)
def test_size_of_other_type(value: str, got: str) -> None:
    error = only_error(f"max_body_bytes = {value}\n")

    assert error.code == "invalid-type"
    assert error.message == (
        'invalid type: expected an integer of bytes or a string such as "64KiB", '
        f"got {got}"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "boolean true"),
        ("x", 'string "x"'),
        ("y" * 50, 'string "' + "y" * 37 + '..."'),
        (3, "integer 3"),
        (1.5, "float 1.5"),
        ([1], "an array"),
        ({"a": 1}, "a table"),
        (datetime.date(2024, 1, 2), "date-time 2024-01-02"),
    ],
)
def test_describe_value(value: object, text: str) -> None:
    assert describe_value(value) == text
