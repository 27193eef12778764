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
import pathlib
import sys
from typing import Optional, Sequence

from nostalgia_jax.sweep.aggregate import (RunResult, aggregate, group_runs, load_results,
                                           markdown_table, mean_std, summarize, write_csv)
from nostalgia_jax.sweep.grid import (DEFAULT_MAIN, METRICS, expand_grid, parse_assignment,
                                      parse_axis, parse_value, run_name)
from nostalgia_jax.sweep.launch import Run, execute, is_complete, plan_runs, read_results

__all__ = [
    "DEFAULT_MAIN", "METRICS", "Run", "RunResult", "aggregate", "execute",
    "expand_grid", "group_runs", "is_complete", "load_results", "main",
    "markdown_table", "mean_std", "parse_assignment", "parse_axis",
    "parse_value", "plan_runs", "read_results", "run_name", "summarize",
    "write_csv",
]


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

