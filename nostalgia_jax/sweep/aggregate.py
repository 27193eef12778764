"""Aggregating the runs of a sweep: Markdown/CSV tables and accuracy plots."""

from __future__ import annotations

import csv
import json
import dataclasses
import math
import os
import pathlib
import warnings
from typing import Any, Optional, Sequence

from nostalgia_jax.sweep.grid import METRICS, parse_value
from nostalgia_jax.sweep.launch import _warn, read_results


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
    # Grid fields only: a field that a run's grid did not set (e.g.
    # nostalgia.merge of a finetune run) is shown as missing, not as the
    # config default it happened to carry.
    fields = list(dict.fromkeys(f for r in runs for f in r.grid if f != "seed"))
    key = lambda run: tuple(run.grid.get(f) for f in fields)
  else:
    fields = list(group_by)
    key = lambda run: tuple(_lookup(run, f) for f in fields)
  groups: dict[tuple, list[RunResult]] = {}
  for run in runs:
    groups.setdefault(key(run), []).append(run)
  return fields, dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[0])))


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
