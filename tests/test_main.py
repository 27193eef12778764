"""End to end: the real entry point on the tiny config, resume, config guard."""

import json
import os
import subprocess
import sys

import pytest

from configs import default as default_config
from nostalgia_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs/default.py") + ":tiny"]


def _main(workdir, *extra):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *TINY,
                         "--workdir", str(workdir), *extra],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.mark.slow
def test_main_writes_results_plots_logs_checkpoints(tiny_run):
  workdir, proc = tiny_run
  results = json.loads((workdir / "results.json").read_text())
  for key in ("accuracy_matrix", "average_accuracy", "backward_transfer",
              "forgetting", "config"):
    assert key in results
  matrix = results["accuracy_matrix"]
  assert len(matrix) == 2 and matrix[0][1] is None
  assert results["complete"] and results["tasks_completed"] == 2
  assert results["config"]["mode"] == "finetune"
  # 5 classes per task: chance is 20%.
  assert all(a > 0.35 for a in matrix[-1]), matrix
  assert results["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
  for name in ("accuracy_matrix.png", "task_accuracy.png", "config.json"):
    assert (workdir / name).stat().st_size > 0
  assert list(workdir.glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["1", "2"]
  assert "ETA" in proc.stderr                          # clu ReportProgress
  assert "After task 1" in proc.stderr


@pytest.mark.slow
def test_rerun_of_finished_workdir_trains_nothing(tiny_run):
  workdir, _ = tiny_run
  before = json.loads((workdir / "results.json").read_text())
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming" in proc.stderr and "Task 0:" not in proc.stderr
  after = json.loads((workdir / "results.json").read_text())
  assert after["accuracy_matrix"] == before["accuracy_matrix"]


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(tiny_run):
  workdir, _ = tiny_run
  proc = _main(workdir, "--config.optim.backbone_lr=0.5")
  assert proc.returncode != 0
  assert "different config" in proc.stderr and "--allow_config_change" in proc.stderr
  assert "optim.backbone_lr" in proc.stderr
  # Nothing already written was touched.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["optim"]["backbone_lr"] != 0.5
  proc = _main(workdir, "--config.optim.backbone_lr=0.5", "--allow_config_change")
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_after_first_task_skips_it(tmp_path, monkeypatch):
  config = default_config.get_config("tiny")
  trained = []
  original = loop._Run.train_phase

  def crash_on_task_1(self, task, *args, **kwargs):
    if task == 1:
      raise KeyboardInterrupt("simulated preemption")
    trained.append(task)
    return original(self, task, *args, **kwargs)

  monkeypatch.setattr(loop._Run, "train_phase", crash_on_task_1)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(tmp_path))
  first = json.loads((tmp_path / "results.json").read_text())
  assert first["tasks_completed"] == 1 and not first["complete"]

  trained.clear()
  def record(self, task, *args, **kwargs):
    trained.append(task)
    return original(self, task, *args, **kwargs)
  monkeypatch.setattr(loop._Run, "train_phase", record)
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert set(trained) == {1}                          # task 0 was not retrained
  assert results["complete"]
  assert results["accuracy_matrix"][0] == first["accuracy_matrix"][0]


@pytest.mark.slow
def test_same_seed_same_results(tiny_run, tmp_path):
  workdir, _ = tiny_run
  proc = _main(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a = json.loads((workdir / "results.json").read_text())["accuracy_matrix"]
  b = json.loads((tmp_path / "results.json").read_text())["accuracy_matrix"]
  assert a == b


@pytest.mark.parametrize("override,allowed", [
    ("--config.mode=replay", "finetune"),
    ("--config.optim.name=lion", "sgd"),
    ("--config.data.augment=mixup", "translate"),
    ("--config.model.variant=XL/16", "pico"),
])
def test_bad_config_values_name_the_allowed_ones(tmp_path, override, allowed):
  proc = _main(tmp_path / "w", override)
  assert proc.returncode != 0
  assert "allowed" in proc.stderr or "expected" in proc.stderr
  assert allowed in proc.stderr
  assert not (tmp_path / "w").exists()                 # nothing written


def test_validate_config_lists_every_error():
  config = default_config.get_config("tiny")
  config.mode = "nope"
  config.train.steps = 0
  config.train.label_smoothing = 1.5
  with pytest.raises(ValueError) as info:
    from nostalgia_jax.train.validation import validate_config
    validate_config(config)
  message = str(info.value)
  assert "config.mode" in message and "config.train.steps" in message
  assert "label_smoothing" in message


def test_unknown_config_variant():
  with pytest.raises(ValueError, match="allowed"):
    default_config.get_config("huge")


@pytest.mark.slow
def test_nonfinite_training_stops_without_a_checkpoint(tmp_path):
  config = default_config.get_config("tiny")
  config.optim.backbone_lr = 1e30                      # overflows at once
  config.optim.head_lr = 1e30
  config.optim.warmup_steps = 0
  config.train.max_nonfinite_steps = 3
  with pytest.raises(loop.NonFiniteTrainingError, match="in a row"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_main_on_eight_cpu_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), *TINY, "--workdir",
       str(tmp_path), "--config.train.steps=20"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["complete"] and results["average_accuracy"] > 0.3
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), *TINY, "--workdir",
       str(tmp_path / "odd"), "--config.train.batch_size=36"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert proc.returncode != 0 and "divisible by the number of devices (8)" in proc.stderr


@pytest.mark.slow
def test_sweep_runs_and_aggregates_two_tiny_runs(tmp_path):
  from nostalgia_jax import sweep
  argv = ["run", "--config", os.path.join(ROOT, "configs/default.py") + ":tiny",
          "--root", str(tmp_path), "--grid", "seed=0,1",
          "--set", "train.steps=10", "--set", "train.head_warmup_steps=2",
          "--main", os.path.join(ROOT, "main.py")]
  assert sweep.main(argv) == 0
  for seed in (0, 1):
    results = json.loads((tmp_path / f"seed={seed}" / "results.json").read_text())
    assert results["complete"] and results["config"]["seed"] == seed
    assert results["config"]["train"]["steps"] == 10
  assert sweep.main(argv) == 0                         # finished runs are skipped
  assert sweep.main(["aggregate", str(tmp_path), "--out", str(tmp_path / "agg")]) == 0
  table = (tmp_path / "agg" / "summary.md").read_text()
  assert "ACC (%)" in table and "| 2 |" in table          # 2 seeds aggregated
