"""The structured-output corpora in tests/data/structured/ (described in
tests/test_structured.py) and the one output validator their tests share."""
import json
import re

from conftest import REPO

DATA = REPO / "tests" / "data" / "structured"


def _load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


SCHEMAS = _load("schemas.json")
REGEXES = _load("regexes.json")
CHOICES = _load("choices.json")
GRAMMARS = _load("grammars.json")
INVALID = _load("invalid.json")
FAST_SCHEMAS = [e for e in SCHEMAS if not e.get("slow")]


def names(entries):
    """Entry names, as pytest ids: a failure names its entry."""
    return [e["name"] for e in entries]


_DATE = re.compile(r"[0-9]{4}-(?P<month>0[1-9]|1[0-2])-(?P<day>0[1-9]|[12][0-9]|3[01])")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_DATE_TIME = re.compile(r"(?P<date>[^Tt ]+)[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
                        r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")


def _validator(schema):
    """A draft 2020-12 validator checking formats, with "date" and "date-time" as
    lenient as llguidance's: February 29 in any year and year 0000, which Python's
    date (and so jsonschema's own checker) refuses, and a leap second (:60) at any
    minute, which RFC 3339's grammar allows (time-second = 00-60) and the
    rfc3339-validator refuses outside 23:59."""
    import jsonschema
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)

    @checker.checks("date")
    def _date(value):
        if not isinstance(value, str):
            return True
        m = _DATE.fullmatch(value)
        return bool(m) and int(m["day"]) <= _MONTH_DAYS[int(m["month"]) - 1]

    @checker.checks("date-time")
    def _date_time(value):
        if not isinstance(value, str):
            return True
        m = _DATE_TIME.fullmatch(value)
        return bool(m) and _date(m["date"])

    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def assert_valid(schema, instance):
    errors = [e.message for e in _validator(schema).iter_errors(instance)]
    assert not errors, f"{instance!r}: {errors}"
