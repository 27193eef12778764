"""End to end per mode on the tiny config: what each mode promises holds.

Each test trains 2 tiny tasks through the real `train_and_evaluate` and then
reads the per-task checkpoints back with orbax directly (not through the
code under test).
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default as default_config
from nostalgia_jax.models import apply_head, classifier_from_config
from nostalgia_jax.train import loop

pytestmark = pytest.mark.slow


def _run(tmp_path, name, **overrides):
  config = default_config.get_config("tiny")
  config.checkpoint.max_to_keep = 0          # keep both tasks' checkpoints
  for path, value in overrides.items():
    section, _, field = path.rpartition(".")
    (config[section] if section else config)[field] = value
  workdir = tmp_path / name
  results = loop.train_and_evaluate(config, str(workdir))
  return results, workdir


def _restore(workdir, step):
  with ocp.CheckpointManager(workdir / "checkpoints") as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, restored.state)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_nostalgia_keeps_task2_change_out_of_the_task1_basis(tmp_path):
  results, workdir = _run(tmp_path, "nostalgia", mode="nostalgia")
  assert results["complete"]
  record = results["tasks"][0]["curvature"]
  assert len(record["eigenvalues"]) == 16 and record["basis_rank"] == 16
  assert record["eigenvalues"] == sorted(record["eigenvalues"], reverse=True)
  assert record["batch_hvps"] > 0 and record["seconds"] > 0
  after_1, after_2 = _restore(workdir, 1), _restore(workdir, 2)
  basis = after_1["continual"]["basis"]              # U after task 0
  k = len(after_1["continual"]["eigenvalues"])
  vectors = np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], basis))
                      for i in range(k)])
  np.testing.assert_allclose(vectors @ vectors.T, np.eye(k), atol=1e-4)
  change = _flat(after_2["backbone"]) - _flat(after_1["backbone"])
  assert np.linalg.norm(change) > 1e-2               # task 2 did train
  along_basis = np.linalg.norm(vectors @ change) / np.linalg.norm(change)
  assert along_basis < 1e-4, along_basis
  assert (workdir / "eigenvalue_spectra.png").stat().st_size > 0


def test_ewc_with_huge_strength_holds_the_backbone(tmp_path):
  common = dict(**{"optim.name": "adam", "optim.backbone_lr": 3e-3,
                   "optim.head_lr": 3e-3})
  finetune, finetune_dir = _run(tmp_path, "finetune", mode="finetune", **common)
  ewc, ewc_dir = _run(tmp_path, "ewc", mode="ewc", **{"ewc.strength": 1e7}, **common)
  assert ewc["tasks"][0]["fisher"]["fisher_examples"] == 256
  drift = {}
  for name, workdir in (("finetune", finetune_dir), ("ewc", ewc_dir)):
    before, after = _restore(workdir, 1), _restore(workdir, 2)
    drift[name] = np.linalg.norm(_flat(after["backbone"]) - _flat(before["backbone"]))
  assert drift["ewc"] < 0.3 * drift["finetune"], drift
  # The checkpoint carries the Fisher and the anchor (= backbone after task 0).
  carried = _restore(ewc_dir, 1)["continual"]
  np.testing.assert_array_equal(_flat(carried["anchor"]),
                                _flat(_restore(ewc_dir, 1)["backbone"]))
  assert np.all(_flat(carried["fisher"]) >= 0)


def test_l2sp_anchor_is_the_initial_backbone(tmp_path):
  results, workdir = _run(tmp_path, "l2sp", mode="l2sp")
  assert results["complete"]
  carried = _restore(workdir, 2)["continual"]
  trained = _restore(workdir, 2)["backbone"]
  assert np.linalg.norm(_flat(trained) - _flat(carried["anchor"])) > 0


def test_lora_nostalgia_trains_adapters_only(tmp_path):
  results, workdir = _run(tmp_path, "lora", mode="nostalgia",
                          **{"lora.enabled": True, "lora.rank": 4,
                             "lora.alpha": 8.0, "nostalgia.k": 8})
  assert results["complete"]
  first, second = _restore(workdir, 1), _restore(workdir, 2)
  # The ViT weights are frozen: bit-identical across tasks.
  jax.tree.map(np.testing.assert_array_equal, first["frozen"], second["frozen"])
  # The trainable backbone is the adapter tree, and the basis lives there.
  assert set(_flat_keys(first["backbone"])) == set(_flat_keys(first["continual"]["basis"]))
  assert all(k.endswith(("lora_a", "lora_b")) for k in _flat_keys(first["backbone"]))
  assert not np.array_equal(_flat(first["backbone"]), _flat(second["backbone"]))
  # The export (adapters merged into plain ViT weights) gives the adapted
  # model's outputs.
  with ocp.StandardCheckpointer() as checkpointer:
    export = checkpointer.restore(workdir / "export")
  config = default_config.get_config("tiny")
  config.lora.enabled, config.lora.rank, config.lora.alpha = True, 4, 8.0
  classifier = classifier_from_config(config, (8, 8, 3))
  images = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 3)).astype(np.float32)
  head = second["heads"]["task_0"]
  adapted = classifier.logits({"backbone": second["backbone"], "head": head},
                              images, frozen=second["frozen"])
  features = classifier.backbone.apply({"params": export["vit"]}, images)
  merged = apply_head(export["heads"]["task_0"], features)
  np.testing.assert_allclose(merged, adapted, atol=1e-4)


def _flat_keys(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_nostalgia_resumes_with_its_basis(tmp_path, monkeypatch):
  original = loop._Run.train_phase

  def crash_on_task_1(self, task, *args, **kwargs):
    if task == 1:
      raise KeyboardInterrupt("simulated preemption")
    return original(self, task, *args, **kwargs)

  monkeypatch.setattr(loop._Run, "train_phase", crash_on_task_1)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path, "resume", mode="nostalgia", **{"nostalgia.merge": "union"})
  monkeypatch.setattr(loop._Run, "train_phase", original)
  results, workdir = _run(tmp_path, "resume", mode="nostalgia",
                          **{"nostalgia.merge": "union"})
  assert results["complete"]
  first, second = _restore(workdir, 1), _restore(workdir, 2)
  # The resumed task 1 was projected on the restored task-0 basis.
  vectors = np.stack([_flat(jax.tree.map(lambda x, i=i: x[i],
                                         first["continual"]["basis"]))
                      for i in range(16)])
  change = _flat(second["backbone"]) - _flat(first["backbone"])
  assert np.linalg.norm(vectors @ change) < 1e-4 * np.linalg.norm(change)
  # Union: the old directions are kept first, the new ones appended.
  assert results["tasks"][1]["curvature"]["basis_rank"] > 16
