"""Launching the runs of a sweep in sequence, skipping complete ones."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from nostalgia_jax.sweep.grid import DEFAULT_MAIN, expand_grid, parse_assignment, parse_value, run_name


@dataclasses.dataclass(frozen=True)
class Run:
  """One launch of main.py: where it lives and what it is called with."""
  name: str
  directory: pathlib.Path
  grid: dict[str, str]
  overrides: dict[str, str]
  config: str
  command: list[str]

  def record(self) -> dict[str, Any]:
    """The content of sweep.json."""
    return {
        "name": self.name,
        "grid": {f: parse_value(v) for f, v in self.grid.items()},
        "grid_text": self.grid,
        "overrides": self.overrides,
        "config": self.config,
        "command": self.command,
    }


def _absolute_config(config: str) -> str:
  """Absolute config path, keeping a `:variant` suffix, so any cwd works."""
  path, sep, arg = config.partition(":")
  return str(pathlib.Path(path).resolve()) + sep + arg if pathlib.Path(path).exists() else config


def plan_runs(
    *, config: str, root: str | os.PathLike, axes: Sequence[str],
    overrides: Sequence[str] = (), main: str | os.PathLike = DEFAULT_MAIN,
) -> list[Run]:
  """Every run of the sweep, in grid order, with its command line."""
  fixed = dict(parse_assignment(o) for o in overrides)
  root = pathlib.Path(root).resolve()
  runs, seen = [], {}
  for point in expand_grid(axes):
    clash = set(point) & set(fixed)
    if clash:
      raise ValueError(f"Field(s) {sorted(clash)} set both by --grid and by --set.")
    name = run_name(point)
    if name in seen:
      raise ValueError(f"Grid points {seen[name]} and {point} share the directory name {name!r}.")
    seen[name] = point
    directory = root / name
    command = [sys.executable, str(pathlib.Path(main).resolve()),
               "--config", _absolute_config(config), "--workdir", str(directory)]
    command += [f"--config.{f}={v}" for f, v in {**fixed, **point}.items()]
    runs.append(Run(name, directory, point, fixed, config, command))
  return runs


# -------------------------------------------------------------- launching --


def read_results(directory: pathlib.Path) -> Optional[dict[str, Any]]:
  """results.json of a run directory, or None if absent or unreadable."""
  try:
    return json.loads((directory / "results.json").read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def is_complete(directory: pathlib.Path) -> bool:
  results = read_results(directory)
  return bool(results and results.get("complete"))


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _log_tail(path: pathlib.Path, lines: int = 5) -> str:
  tail = path.read_text(errors="replace").splitlines()[-lines:]
  return "\n".join("      " + line for line in tail)


def _warn_if_changed(run: Run, record: dict[str, Any]) -> None:
  stored_path = run.directory / "sweep.json"
  if not stored_path.exists():
    return
  stored = json.loads(stored_path.read_text())
  changed = [k for k in ("grid_text", "overrides", "config") if stored.get(k) != record[k]]
  if changed:
    before = {k: stored.get(k) for k in changed}
    now = {k: record[k] for k in changed}
    _warn(f"{run.name} was launched before with other settings: {before}, now {now}.")


def execute(runs: Sequence[Run], *, dry_run: bool = False) -> list[str]:
  """Runs the sweep in sequence; returns the names of the runs that failed."""
  failed, skipped, launched = [], 0, 0
  for i, run in enumerate(runs, 1):
    prefix = f"[{i}/{len(runs)}] {run.name}"
    record = run.record()
    if is_complete(run.directory):
      _warn_if_changed(run, record)
      print(f"{prefix}: complete, skipped")
      skipped += 1
      continue
    if dry_run:
      print(f"{prefix}: would run {shlex.join(run.command)}")
      continue
    run.directory.mkdir(parents=True, exist_ok=True)
    _warn_if_changed(run, record)
    (run.directory / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    log_path = run.directory / "log.txt"
    print(f"{prefix}: running (log: {log_path})", flush=True)
    launched += 1
    start = time.time()
    with open(log_path, "a") as log:
      log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(run.command)}\n")
      log.flush()
      returncode = subprocess.run(
          run.command, stdout=log, stderr=subprocess.STDOUT,
          cwd=pathlib.Path(run.command[1]).parent,
          env={**os.environ, "PYTHONUNBUFFERED": "1"},  # so log.txt streams
      ).returncode
    minutes = (time.time() - start) / 60
    if returncode != 0:
      print(f"{prefix}: FAILED with exit code {returncode} after {minutes:.1f} min; "
            f"last lines of {log_path}:\n{_log_tail(log_path)}")
      failed.append(run.name)
    elif not is_complete(run.directory):
      print(f"{prefix}: FAILED: exited 0 but {run.directory / 'results.json'} is "
            "missing or not complete")
      failed.append(run.name)
    else:
      accuracy = read_results(run.directory).get("average_accuracy")
      print(f"{prefix}: done in {minutes:.1f} min, average_accuracy={accuracy}")
  print(f"{len(runs)} runs: {skipped} skipped as complete, {launched} launched, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else ""))
  return failed


# ------------------------------------------------------------ aggregation --
