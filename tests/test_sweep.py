"""Sweep launcher and aggregation: grids, names, skipping, statistics, CLI."""

import csv
import json
import math
import textwrap

import pytest

from nostalgia_jax import sweep


# ----------------------------------------------------------------- grids --


def test_parse_value():
  assert sweep.parse_value("3") == 3 and isinstance(sweep.parse_value("3"), int)
  assert sweep.parse_value("-2") == -2
  assert sweep.parse_value("1e-3") == 0.001
  assert sweep.parse_value("True") is True and sweep.parse_value("false") is False
  assert sweep.parse_value("B/32") == "B/32"


def test_expand_grid_is_the_cartesian_product_in_order():
  points = sweep.expand_grid(["mode=finetune,nostalgia", "seed=0,1,2"])
  assert points == [{"mode": m, "seed": s} for m in ("finetune", "nostalgia") for s in "012"]


def test_combined_axis_sets_several_fields_at_once():
  points = sweep.expand_grid([
      "mode=nostalgia;nostalgia.merge=union|mode=nostalgia;nostalgia.merge=average|mode=finetune",
      "seed=0,1",
  ])
  assert len(points) == 6
  assert points[0] == {"mode": "nostalgia", "nostalgia.merge": "union", "seed": "0"}
  assert points[3] == {"mode": "nostalgia", "nostalgia.merge": "average", "seed": "1"}
  assert points[5] == {"mode": "finetune", "seed": "1"}


@pytest.mark.parametrize("axes, message", [
    (["seed=0,1", "mode=a|seed=3"], "set by two grid axes"),
    (["mode=a;b=1,2|mode=c"], "Commas are not allowed"),
    (["mode=a;mode=b"], "assigned twice"),
    (["lr"], "Expected FIELD=VALUE"),
    (["9lr=1"], "Expected FIELD=VALUE"),
    (["seed=0,,1"], "Empty value"),
])
def test_bad_grids_are_rejected_with_a_reason(axes, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand_grid(axes)


def test_run_names_are_sorted_seed_last_sanitized_and_order_independent():
  assert sweep.run_name({"seed": "1", "mode": "nostalgia", "nostalgia.merge": "union"}) == (
      "mode=nostalgia,nostalgia.merge=union,seed=1")
  assert sweep.run_name({"model.variant": "B/32"}) == "model.variant=B_32"
  assert sweep.run_name({}) == "default"
  a = [r.name for r in sweep.plan_runs(config="c.py", root="r", axes=["seed=0,1", "mode=x,y"])]
  b = [r.name for r in sweep.plan_runs(config="c.py", root="r", axes=["mode=x,y", "seed=0,1"])]
  assert sorted(a) == sorted(b) and len(set(a)) == 4
  assert len(sweep.run_name({"x": "v" * 500})) <= 200


def test_plan_runs_builds_the_command(tmp_path):
  config = tmp_path / "default.py"
  config.write_text("")
  (run,) = sweep.plan_runs(config=f"{config}:tiny", root=tmp_path / "study",
                           axes=["mode=nostalgia;nostalgia.merge=union"],
                           overrides=["train.steps=100"], main=tmp_path / "main.py")
  assert run.directory == tmp_path / "study" / "mode=nostalgia,nostalgia.merge=union"
  assert run.command[1:] == [
      str(tmp_path / "main.py"), "--config", f"{config}:tiny",
      "--workdir", str(run.directory), "--config.train.steps=100",
      "--config.mode=nostalgia", "--config.nostalgia.merge=union"]
  assert run.record()["grid"] == {"mode": "nostalgia", "nostalgia.merge": "union"}


def test_plan_runs_rejects_clashes(tmp_path):
  with pytest.raises(ValueError, match="both by --grid and by --set"):
    sweep.plan_runs(config="c.py", root=tmp_path, axes=["seed=0,1"], overrides=["seed=3"])
  with pytest.raises(ValueError, match="share the directory name"):
    sweep.plan_runs(config="c.py", root=tmp_path, axes=["v=a/b,a_b"])


def test_complete_runs_are_skipped_without_launching(tmp_path, capsys):
  runs = sweep.plan_runs(config="c.py", root=tmp_path, axes=["seed=0"],
                         main=tmp_path / "missing_main.py")
  runs[0].directory.mkdir()
  (runs[0].directory / "results.json").write_text(json.dumps({"complete": True}))
  assert sweep.execute(runs) == []  # launching the missing main would fail
  assert "complete, skipped" in capsys.readouterr().out
  assert not (runs[0].directory / "log.txt").exists()


# ----------------------------------------------------------- aggregation --


def _write_run(root, name, grid, *, acc, bwt, forgetting, complete=True, matrix=None,
               config=None):
  directory = root / name
  directory.mkdir(parents=True)
  (directory / "sweep.json").write_text(json.dumps({"grid": grid}))
  results = {
      "accuracy_matrix": matrix or [[acc, None], [acc, acc]],
      "average_accuracy": acc, "backward_transfer": bwt, "forgetting": forgetting,
      "config": config or {}, "num_tasks": 2, "tasks_completed": 2 if complete else 1,
      "complete": complete,
  }
  (directory / "results.json").write_text(json.dumps(results))


def _synthetic_study(root):
  for seed, acc in zip((0, 1, 2), (0.70, 0.80, 0.90)):
    _write_run(root, f"mode=nostalgia,seed={seed}", {"mode": "nostalgia", "seed": seed},
               acc=acc, bwt=-0.01 * seed, forgetting=0.02, config={"optim": {"lr": 0.1}})
  for seed, acc in zip((0, 1), (0.50, 0.60)):
    _write_run(root, f"mode=finetune,seed={seed}", {"mode": "finetune", "seed": seed},
               acc=acc, bwt=-0.3, forgetting=0.3, config={"optim": {"lr": 0.1}})
  _write_run(root, "mode=finetune,seed=2", {"mode": "finetune", "seed": 2},
             acc=0.0, bwt=0.0, forgetting=0.0, complete=False)


def test_aggregate_statistics_by_hand(tmp_path, capsys):
  _synthetic_study(tmp_path)
  table = sweep.aggregate(tmp_path, out=tmp_path / "summary")
  assert "mode=finetune,seed=2: incomplete (1/2 tasks), left out" in capsys.readouterr().err
  # nostalgia: mean 0.8, sample std sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1
  # finetune:  mean 0.55, sample std sqrt(2 * 0.05^2 / 1) = 0.0707...
  assert "| finetune | 2 | 55.00 ± 7.07 | -30.00 ± 0.00 | 30.00 ± 0.00 |" in table
  assert "| nostalgia | 3 | 80.00 ± 10.00 | -1.00 ± 1.00 | 2.00 ± 0.00 |" in table
  with open(tmp_path / "summary" / "summary.csv") as f:
    rows = {r["mode"]: r for r in csv.DictReader(f)}
  assert math.isclose(float(rows["nostalgia"]["average_accuracy_mean"]), 0.8)
  assert math.isclose(float(rows["nostalgia"]["average_accuracy_std"]), 0.1)
  assert math.isclose(float(rows["finetune"]["average_accuracy_std"]), math.sqrt(0.005))
  assert rows["finetune"]["num_seeds"] == "2" and rows["nostalgia"]["seeds"] == "0;1;2"
  assert (tmp_path / "summary" / "summary.md").read_text().startswith("| mode | seeds |")
  assert (tmp_path / "summary" / "accuracy_curves.png").stat().st_size > 1000


def test_group_by_config_field_and_single_seed(tmp_path):
  _synthetic_study(tmp_path)
  fields, groups = sweep.group_runs(sweep.load_results(tmp_path), ["optim.lr"])
  assert fields == ["optim.lr"] and list(groups) == [(0.1,)]
  (row,) = sweep.summarize(fields, groups)
  assert row["num_seeds"] == 5
  assert sweep.mean_std([0.5])[0] == 0.5 and math.isnan(sweep.mean_std([0.5])[1])
  assert sweep.markdown_table(["x"], [{"x": None, "num_seeds": 1, **{
      f"{m}_{s}": v for m in sweep.METRICS for s, v in (("mean", 0.5), ("std", math.nan))}}]
  ).endswith("| — | 1 | 50.00 | 50.00 | 50.00 |")


# ------------------------------------------------------------ end to end --

FAKE_MAIN = textwrap.dedent("""
    import json, pathlib, sys
    args = sys.argv[1:]
    workdir = pathlib.Path(args[args.index("--workdir") + 1])
    assert pathlib.Path(args[args.index("--config") + 1]).is_absolute()
    cfg = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    counter = workdir / "launches"
    launch = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(launch))
    print("launch", launch, cfg)
    if cfg["mode"] == "bad":
      sys.exit(3)
    complete = not (cfg.get("preempt") == "true" and launch == 1)
    acc = 0.5 + 0.1 * int(cfg["seed"])
    (workdir / "results.json").write_text(json.dumps({
        "accuracy_matrix": [[acc, None], [acc - 0.1, acc]], "average_accuracy": acc,
        "backward_transfer": -0.1, "forgetting": 0.1, "num_tasks": 2,
        "tasks_completed": 2 if complete else 1, "complete": complete,
        "config": {"mode": cfg["mode"], "train": {"steps": int(cfg["train.steps"])}}}))
    sys.exit(0 if complete else 1)  # a preempted run dies
""")


def _launch(tmp_path, *grid):
  main_py = tmp_path / "fake_main.py"
  main_py.write_text(FAKE_MAIN)
  config = tmp_path / "config.py"
  config.write_text("")
  argv = ["run", "--config", str(config), "--root", str(tmp_path / "study"),
          "--main", str(main_py), "--set", "train.steps=7"]
  for axis in grid:
    argv += ["--grid", axis]
  return sweep.main(argv)


def _launches(tmp_path, name):
  return int((tmp_path / "study" / name / "launches").read_text())


def test_cli_runs_then_skips_then_aggregates(tmp_path, capsys):
  assert _launch(tmp_path, "mode=nostalgia", "seed=0,1") == 0
  names = ["mode=nostalgia,seed=0", "mode=nostalgia,seed=1"]
  for name in names:
    assert _launches(tmp_path, name) == 1
    assert "launch 1" in (tmp_path / "study" / name / "log.txt").read_text()
  record = json.loads((tmp_path / "study" / names[1] / "sweep.json").read_text())
  assert record["grid"] == {"mode": "nostalgia", "seed": 1}
  assert record["overrides"] == {"train.steps": "7"}
  capsys.readouterr()

  assert _launch(tmp_path, "seed=0,1", "mode=nostalgia") == 0  # axis order does not matter
  assert capsys.readouterr().out.count("complete, skipped") == 2
  assert all(_launches(tmp_path, name) == 1 for name in names)

  assert sweep.main(["aggregate", str(tmp_path / "study")]) == 0
  out = capsys.readouterr().out
  assert "| nostalgia | 2 | 55.00 ± 7.07 | -10.00 ± 0.00 | 10.00 ± 0.00 |" in out
  assert (tmp_path / "study" / "summary.csv").exists()


def test_cli_reports_failures_continues_and_resumes(tmp_path, capsys):
  assert _launch(tmp_path, "mode=bad,ok", "seed=0", "preempt=true") == 1
  out = capsys.readouterr().out
  assert "mode=bad,preempt=true,seed=0: FAILED with exit code 3" in out
  assert "mode=ok,preempt=true,seed=0: FAILED with exit code 1" in out  # preempted
  assert "2 failed" in out
  # The preempted run is launched again (main.py resumes it), then skipped.
  assert _launch(tmp_path, "mode=ok", "seed=0", "preempt=true") == 0
  assert _launches(tmp_path, "mode=ok,preempt=true,seed=0") == 2
  log = (tmp_path / "study" / "mode=ok,preempt=true,seed=0" / "log.txt").read_text()
  assert "launch 1" in log and "launch 2" in log and log.count("==== ") == 2


def test_dry_run_creates_nothing_and_missing_main_is_an_error(tmp_path, capsys):
  root = tmp_path / "study"
  assert sweep.main(["run", "--config", "c.py", "--root", str(root), "--grid", "seed=0,1",
                     "--main", str(tmp_path / "nope.py"), "--dry_run"]) == 0
  assert capsys.readouterr().out.count("would run") == 2 and not root.exists()
  assert sweep.main(["run", "--config", "c.py", "--root", str(root), "--grid", "seed=0",
                     "--main", str(tmp_path / "nope.py")]) == 2
  assert "does not exist" in capsys.readouterr().err
