"""Grid axes of a sweep: parsing, expansion and run names (see the package
docstring for the syntax)."""

from __future__ import annotations

import hashlib
import itertools
import pathlib
import re
from typing import Any, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_MAIN = REPO_ROOT / "main.py"
METRICS = ("average_accuracy", "backward_transfer", "forgetting")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 200


# ------------------------------------------------------------------ grids --


def parse_value(text: str) -> Any:
  """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, anything else -> the text."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if re.fullmatch(r"[+-]?\d+", text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return text


def parse_assignment(text: str) -> tuple[str, str]:
  """'optim.lr=0.1' -> ('optim.lr', '0.1'), with a clear error otherwise."""
  field, sep, value = text.partition("=")
  field = field.strip()
  if not sep or not _FIELD.match(field) or value == "":
    raise ValueError(
        f"Expected FIELD=VALUE with a dotted config path, e.g. optim.lr=0.1; got {text!r}."
    )
  return field, value


def parse_axis(spec: str) -> list[dict[str, str]]:
  """One `--grid` value -> its alternatives, each {field: value text}."""
  if "|" in spec or ";" in spec:
    alternatives = []
    for alternative in spec.split("|"):
      assignments = [parse_assignment(a) for a in alternative.split(";") if a.strip()]
      if not assignments:
        raise ValueError(f"Empty alternative in combined grid axis {spec!r}.")
      fields = [f for f, _ in assignments]
      if len(set(fields)) != len(fields):
        raise ValueError(f"A field is assigned twice in {alternative!r} of {spec!r}.")
      if any("," in v for _, v in assignments):
        raise ValueError(
            f"Commas are not allowed in a combined grid axis ({spec!r}): write each "
            "combination as its own '|'-separated alternative."
        )
      alternatives.append(dict(assignments))
    return alternatives
  field, values = parse_assignment(spec)
  texts = values.split(",")
  if any(t == "" for t in texts):
    raise ValueError(f"Empty value in grid axis {spec!r}.")
  return [{field: t} for t in texts]


def expand_grid(axes: Sequence[str]) -> list[dict[str, str]]:
  """Cartesian product of the axes: one {field: value text} per run."""
  parsed = [parse_axis(a) for a in axes]
  owner: dict[str, str] = {}
  for spec, alternatives in zip(axes, parsed):
    for field in {f for alt in alternatives for f in alt}:
      if field in owner:
        raise ValueError(f"Field {field!r} is set by two grid axes: {owner[field]!r} and {spec!r}.")
      owner[field] = spec
  return [
      {f: v for alt in combination for f, v in alt.items()}
      for combination in itertools.product(*parsed)
  ]


def run_name(point: dict[str, str]) -> str:
  """Stable, readable directory name of a grid point (see module docstring)."""
  if not point:
    return "default"
  fields = sorted(point, key=lambda f: (f == "seed", f))
  name = _UNSAFE.sub("_", ",".join(f"{f}={point[f]}" for f in fields))
  if len(name) > _MAX_NAME:  # file systems cap names at 255 bytes
    name = name[: _MAX_NAME - 11] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
  return name
