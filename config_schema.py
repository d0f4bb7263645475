"""Config fields declared once: default, allowed values and meaning, checked on construction.

Every config section is a frozen dataclass whose fields are declared with
`field(default, allowed, doc)`; constructing the dataclass from the section's
values checks each one and raises a `UserError` naming `section.field`. The
same declarations give the defaults of `configs/base.py`, the table printed by
`python -m configs.base`, and the bad values the tests try on every field.

`allowed` is one of:
    "[1, inf)", "(0, 1]", "{-1} | [1, inf)"   numbers: intervals and sets, joined by "|"
    ("a", "b")                                one of these strings
    bool                                      True or False
    str                                       any string (checked elsewhere, if at all)
    "file"                                    an existing file, or "" for the default
    "dir"                                     an existing directory, or "" for the default
    "text"                                    a non-empty string
    "globs"                                   comma-separated globs that match files
`needed_if="field=value"` checks a "text"/"globs" field only when that other field
of the section has that value (e.g. data.train_files only when data.source=files).
"""

import dataclasses
import glob
import math
import os
import re

from errors import UserError

PATH_KINDS = ("file", "dir", "text", "globs")


@dataclasses.dataclass(frozen=True)
class Spec:
    allowed: object
    doc: str
    needed_if: str = ""

    def describe(self) -> str:
        if isinstance(self.allowed, tuple):
            return " | ".join(self.allowed)
        if self.allowed is bool:
            return "True | False"
        if self.allowed is str:
            return "string"
        return str(self.allowed)


def field(default, allowed, doc: str, needed_if: str = ""):
    """A dataclass field carrying its allowed values and documentation."""
    return dataclasses.field(default=default, metadata={"spec": Spec(allowed, doc, needed_if)})


def _parse_numbers(allowed: str):
    """'{-1} | [1, inf)' -> list of predicates on a number."""
    parts = []
    for part in (p.strip() for p in allowed.split("|")):
        if part.startswith("{"):
            members = {float(x) for x in part.strip("{}").split(",")}
            parts.append(lambda x, members=members: x in members)
            continue
        match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", part)
        if not match:
            raise ValueError(f"cannot read the interval {part!r}")
        lo, hi = float(match[2]), float(match[3])
        lo_ok = (lambda x, lo=lo: x >= lo) if match[1] == "[" else (lambda x, lo=lo: x > lo)
        hi_ok = (lambda x, hi=hi: x <= hi) if match[4] == "]" else (lambda x, hi=hi: x < hi)
        parts.append(lambda x, a=lo_ok, b=hi_ok: a(x) and b(x))
    return parts


def number_allowed(allowed: str, value) -> bool:
    return any(ok(value) for ok in _parse_numbers(allowed))


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _needed(obj, spec: Spec) -> bool:
    if not spec.needed_if:
        return True
    other, _, wanted = spec.needed_if.partition("=")
    return str(getattr(obj, other)) == wanted


def _problem(obj, f: dataclasses.Field, value) -> str | None:
    """What is wrong with `value` for field `f` of `obj`, or None."""
    spec = f.metadata["spec"]
    allowed = spec.allowed
    if not _type_ok(value, f.default):
        return f"must be a {type(f.default).__name__}, got {type(value).__name__}"
    if isinstance(allowed, tuple):
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    if allowed in (bool, str):
        return None
    if allowed in PATH_KINDS:
        if not _needed(obj, spec):
            return None
        if allowed == "text":
            return None if value.strip() else f"must not be empty ({spec.doc})"
        if allowed == "globs":
            if not value.strip():
                return f"is empty; give comma-separated file globs ({spec.doc})"
            for pattern in filter(None, (g.strip() for g in value.split(","))):
                if not glob.glob(os.path.expanduser(pattern)):
                    return f"{pattern!r} matches no file"
            return None
        if not value:
            return None  # "" = the documented default
        exists = os.path.isfile if allowed == "file" else os.path.isdir
        return None if exists(os.path.expanduser(value)) else f"no such {allowed}: {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite and in {allowed}"
    return None if number_allowed(allowed, value) else f"must be in {allowed}"


def check_fields(obj, section: str) -> None:
    """Raises UserError for the first field of dataclass `obj` whose value is not allowed."""
    for f in dataclasses.fields(obj):
        if "spec" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        problem = _problem(obj, f, value)
        if problem:
            raise UserError(f"{section}.{f.name}={value!r}: {problem}.")


def from_values(cls, values, section: str):
    """`cls(**values)`, naming unknown keys; the dataclass checks the values itself."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}.")
    return cls(**values)


def defaults(cls) -> dict:
    """The section's default values, as a plain dict (for an ml_collections ConfigDict)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def specs(cls) -> dict[str, Spec]:
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls) if "spec" in f.metadata}
