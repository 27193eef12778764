"""Launch grids of runs of `main.py` locally and aggregate their results.

Launch (runs execute one after another as subprocesses):

    python -m nostalgia_jax.sweep run --config configs/default.py \\
        --root runs/study \\
        --grid "mode=nostalgia;nostalgia.merge=union|mode=nostalgia;nostalgia.merge=average|mode=finetune" \\
        --grid seed=0,1,2 --set train.steps=100 [--main main.py] [--dry_run]

Aggregate (Markdown table to stdout; summary.md, summary.csv and
accuracy_curves.png written to --out, default the root):

    python -m nostalgia_jax.sweep aggregate runs/study [--out DIR] \\
        [--group_by mode,nostalgia.merge]

Grid syntax. Each `--grid` is one axis; the runs are the Cartesian product
of all axes, each combined with every `--set FIELD=VALUE` override.
  * Simple axis `FIELD=V1,V2,...`: one field, comma-separated values.
  * Combined axis `A=1;B=x|A=2|...`: alternatives separated by `|`, each a
    `;`-separated list of assignments applied together (fields may differ
    between alternatives). Commas are not allowed inside a combined axis:
    write each combination as its own alternative.
Fields are config paths (`optim.lr`); a field may be set by one axis only,
and not by both an axis and `--set`. Values go to `main.py` verbatim as
`--config.FIELD=VALUE` (ml_collections parses them by the field's type);
`sweep.json` records them parsed as int, float, bool (true/false) or str.

Run directories. `ROOT/NAME`, where NAME lists the run's grid assignments
sorted by field with `seed` last, e.g. `mode=nostalgia,nostalgia.merge=union,seed=1`
(characters other than letters, digits and `._=,+-` become `_`). Names do not
depend on the order of the `--grid` flags, so a re-launched sweep finds its
runs. Each run directory holds `sweep.json` (its grid values, overrides and
command), `log.txt` (the run's stdout and stderr, appended on every launch)
and the `results.json` written by `main.py`.

Resuming. A run whose results.json says `complete` is skipped; any other is
launched again with the same command and `main.py` resumes it from its
checkpoint. A failed run is reported and the sweep goes on; the exit code is
1 if any run failed.

Aggregation groups complete runs by their grid values except `seed` (or by
`--group_by` fields, looked up in the grid values, then in the resolved
config of results.json) and reports the number of seeds and mean ± sample
standard deviation (ddof=1; none with a single seed) of average_accuracy,
backward_transfer and forgetting. results.json stores accuracies as
fractions in [0, 1]; the Markdown table and the plot show percentages, the
CSV raw fractions. Incomplete runs are left out with a warning.

This module never imports JAX: launching a sweep must stay cheap.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import warnings
from typing import Any, Optional, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
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


@dataclasses.dataclass(frozen=True)
class RunResult:
  name: str
  grid: dict[str, Any]
  results: dict[str, Any]


def _grid_from_name(name: str) -> dict[str, Any]:
  """Fallback when sweep.json is missing: the name lists the grid values."""
  pairs = [p.partition("=") for p in name.split(",")]
  return {f: parse_value(v) for f, sep, v in pairs if sep}


def load_results(root: str | os.PathLike) -> list[RunResult]:
  """Complete runs under root (one directory level); warns about the others."""
  runs = []
  for directory in sorted(pathlib.Path(root).iterdir()):
    has_record = (directory / "sweep.json").exists()
    if not directory.is_dir() or not (has_record or (directory / "results.json").exists()):
      continue
    results = read_results(directory)
    if results is None:
      _warn(f"{directory.name}: no readable results.json, left out.")
      continue
    if not results.get("complete"):
      done = f"{results.get('tasks_completed')}/{results.get('num_tasks')}"
      _warn(f"{directory.name}: incomplete ({done} tasks), left out.")
      continue
    grid = (json.loads((directory / "sweep.json").read_text())["grid"] if has_record
            else _grid_from_name(directory.name))
    runs.append(RunResult(directory.name, grid, results))
  return runs


def _lookup(run: RunResult, field: str) -> Any:
  if field in run.grid:
    return run.grid[field]
  node: Any = run.results.get("config", {})
  for part in field.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return json.dumps(node) if isinstance(node, (list, dict)) else node


def _sort_key(values: tuple) -> tuple:
  return tuple((2, "") if v is None else (0, v) if isinstance(v, (int, float))
               else (1, str(v)) for v in values)


def group_runs(
    runs: Sequence[RunResult], group_by: Optional[Sequence[str]] = None
) -> tuple[list[str], dict[tuple, list[RunResult]]]:
  """Groups runs by fields (default: all grid fields but seed), sorted."""
  if group_by is None:
    group_by = list(dict.fromkeys(f for r in runs for f in r.grid if f != "seed"))
  groups: dict[tuple, list[RunResult]] = {}
  for run in runs:
    groups.setdefault(tuple(_lookup(run, f) for f in group_by), []).append(run)
  return list(group_by), dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[0])))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for fewer than 2)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
  return mean, std


def summarize(fields: Sequence[str], groups: dict[tuple, list[RunResult]]) -> list[dict]:
  """One row per setting: its field values, seeds, mean and std per metric."""
  rows = []
  for key, runs in groups.items():
    row: dict[str, Any] = dict(zip(fields, key))
    row["num_seeds"] = len(runs)
    row["seeds"] = ";".join(str(r.grid.get("seed", "")) for r in runs)
    for metric in METRICS:
      values = [r.results[metric] for r in runs if r.results.get(metric) is not None]
      row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
    rows.append(row)
  return rows


def _percent(mean: float, std: float) -> str:
  if math.isnan(mean):
    return "n/a"
  return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")


def markdown_table(fields: Sequence[str], rows: Sequence[dict]) -> str:
  header = [*fields, "seeds", "ACC (%)", "BWT (%)", "Forgetting (%)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = ["—" if row[f] is None else str(row[f]) for f in fields]
    cells.append(str(row["num_seeds"]))
    cells += [_percent(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(path: pathlib.Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
  columns = [*fields, "num_seeds", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def _setting_label(fields: Sequence[str], key: tuple) -> str:
  return ", ".join(f"{f}={v}" for f, v in zip(fields, key) if v is not None) or "all runs"


def plot_accuracy_curves(path: pathlib.Path, fields: Sequence[str],
                         groups: dict[tuple, list[RunResult]]) -> None:
  """Average accuracy over seen tasks per setting, then per-task curves per setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  import numpy as np

  curves = {}
  for key, runs in groups.items():
    matrices = [np.array([[np.nan if a is None else a for a in row]
                          for row in r.results["accuracy_matrix"]], float) for r in runs]
    if len({m.shape for m in matrices}) != 1:
      _warn(f"{_setting_label(fields, key)}: runs differ in task count, not plotted.")
      continue
    curves[key] = 100 * np.stack(matrices)  # (seeds, tasks, tasks)
  if not curves:
    return
  num_panels = 1 + len(curves)
  cols = min(3, num_panels)
  rows = math.ceil(num_panels / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
  axes = axes.ravel()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of unseen entries
    for key, acc in curves.items():
      tasks = np.arange(1, acc.shape[1] + 1)
      seen = np.stack([np.nanmean(acc[:, i, : i + 1], axis=1) for i in range(acc.shape[1])], 1)
      mean = seen.mean(0)
      std = seen.std(0, ddof=1) if len(seen) > 1 else np.zeros_like(mean)
      line, = axes[0].plot(tasks, mean, marker="o", label=_setting_label(fields, key))
      axes[0].fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set(title="Average accuracy over seen tasks (mean ± std over seeds)",
                xlabel="after training task", ylabel="accuracy (%)")
    axes[0].legend(fontsize="small")
    for ax, (key, acc) in zip(axes[1:], curves.items()):
      num_tasks = acc.shape[1]
      mean = np.nanmean(acc, axis=0)
      colors = plt.cm.viridis(np.linspace(0, 0.9, num_tasks))
      for j in range(num_tasks):
        ax.plot(np.arange(j + 1, num_tasks + 1), mean[j:, j], marker=".", color=colors[j],
                label=f"task {j + 1}")
      ax.set(title=_setting_label(fields, key), xlabel="after training task",
             ylabel="accuracy on task (%)", ylim=(0, 100))
      if num_tasks <= 20:
        ax.legend(fontsize="x-small", ncol=2 if num_tasks > 10 else 1)
  for ax in axes[:num_panels]:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.title.set_fontsize("medium")
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def aggregate(root: str | os.PathLike, *, out: Optional[str | os.PathLike] = None,
              group_by: Optional[Sequence[str]] = None) -> str:
  """Writes summary.md, summary.csv and accuracy_curves.png; returns the table."""
  runs = load_results(root)
  if not runs:
    raise ValueError(f"No complete runs (results.json with complete=true) under {root}.")
  fields, groups = group_runs(runs, group_by)
  rows = summarize(fields, groups)
  table = markdown_table(fields, rows)
  out_dir = pathlib.Path(out or root)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "summary.md").write_text(
      table + "\n\nmean ± sample std (ddof=1) over seeds, in %.\n")
  write_csv(out_dir / "summary.csv", fields, rows)
  plot_accuracy_curves(out_dir / "accuracy_curves.png", fields, groups)
  return table


# -------------------------------------------------------------------- CLI --


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m nostalgia_jax.sweep", allow_abbrev=False,
      description=__doc__.split("\n")[0], epilog="See the module docstring for the grid syntax.")
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", allow_abbrev=False, help="launch a grid of runs")
  run.add_argument("--config", required=True, help="config file for main.py")
  run.add_argument("--root", required=True, help="directory holding one folder per run")
  run.add_argument("--grid", action="append", default=[], help="one grid axis (repeatable)")
  run.add_argument("--set", action="append", default=[], dest="overrides",
                   help="FIELD=VALUE override for every run (repeatable)")
  run.add_argument("--main", default=str(DEFAULT_MAIN), help="training entry point")
  run.add_argument("--dry_run", action="store_true", help="print the commands only")
  agg = commands.add_parser("aggregate", allow_abbrev=False, help="summarise a sweep")
  agg.add_argument("root")
  agg.add_argument("--out", default=None, help="output directory (default: root)")
  agg.add_argument("--group_by", action="append", default=None,
                   help="comma-separated fields to group by (default: grid fields but seed)")
  args = parser.parse_args(argv)

  try:
    if args.command == "run":
      if not args.dry_run and not pathlib.Path(args.main).is_file():
        raise ValueError(f"--main {args.main} does not exist; pass the path to main.py.")
      runs = plan_runs(config=args.config, root=args.root, axes=args.grid,
                       overrides=args.overrides, main=args.main)
      return 1 if execute(runs, dry_run=args.dry_run) else 0
    group_by = None if args.group_by is None else [
        f for spec in args.group_by for f in spec.split(",") if f]
    print(aggregate(args.root, out=args.out, group_by=group_by))
    return 0
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
