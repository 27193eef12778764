"""The task-sequential training loop: `train_and_evaluate(config, workdir)`.

For each task t (resuming after the last finished task in the workdir):
  1. head warm-up: a new head for task t, trained with the backbone frozen
     (and without projection or penalty);
  2. full training of backbone + head with the base optimizer, projected
     onto the null space of the curvature basis (nostalgia) or with a penalty
     in the loss (l2sp, ewc);
  3. evaluation of every task seen so far -> row t of the accuracy matrix;
  4. the mode's after-task work (curvature + merge; EWC Fisher);
  5. checkpoint, results.json, plots and TensorBoard summaries.
"""

from __future__ import annotations

import time

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import ml_collections
import numpy as np
from etils import epath

from nostalgia_jax import sharding as shd
from nostalgia_jax.curvature import tree_math
from nostalgia_jax.data import eval_batches, load_dataset, make_task_splits, train_dataset
from nostalgia_jax.data.pipeline import task_examples
from nostalgia_jax.models import classifier_from_config
from nostalgia_jax.optim import optimizers
from nostalgia_jax.train import checkpointing, continual, reporting, steps
from nostalgia_jax.train.validation import validate_config


class NonFiniteTrainingError(FloatingPointError):
  """Too many consecutive training steps had a non-finite loss or update."""


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class _Run:
  """What every phase of one run shares: mesh, data, model, writer, steps."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = workdir
    self.mesh = shd.make_mesh()
    self.dataset = load_dataset(config.data)
    self.splits = make_task_splits(
        self.dataset.train.labels, self.dataset.test.labels,
        num_classes=self.dataset.num_classes, num_tasks=config.data.num_tasks,
        order=config.data.class_order, seed=config.seed)
    self.classifier = classifier_from_config(config, self.dataset.image_shape)
    self.steps_per_task = config.train.head_warmup_steps + config.train.steps
    self.warmup_optimizer = optimizers.head_warmup_optimizer(
        config.optim, max(config.train.head_warmup_steps, 1))
    self.full_optimizer = optimizers.full_optimizer(
        config.optim, config.train.steps,
        projection_placement=continual.projection_placement(config))
    self.penalty_fn = continual.penalty_fn(config)
    self.writer = self.report_progress = None
    self._jitted = {}

  def open_writer(self):
    """TensorBoard writer and progress reporter (creates files in workdir)."""
    self.writer = metric_writers.create_default_writer(
        self.workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    self.report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.steps_per_task * self.config.data.num_tasks,
        writer=self.writer, every_steps=self.config.train.log_every)

  @property
  def num_tasks(self) -> int:
    return len(self.splits)

  def _key(self, *parts: int):
    return jax.random.key(_seed(self.config.seed, *parts))

  # -- Initialisation ---------------------------------------------------------

  def init_model(self):
    """(trainable backbone, frozen base or None) at the start of the sequence."""
    vit = self.classifier.init_vit(self._key(0))
    if self.classifier.lora is None:
      return vit, None
    return self.classifier.init_adapters(vit, self._key(1)), vit

  def init_head(self, task: int):
    return self.classifier.init_head(self.splits[task].num_classes,
                                     self._key(2, task))

  def abstract_checkpoint(self, tasks_done: int, continual_spec: dict):
    """Shapes, dtypes and shardings of the checkpoint after `tasks_done`."""
    def build():
      backbone, frozen = self.init_model()
      tree = {"backbone": backbone,
              "heads": {f"task_{t}": self.init_head(t) for t in range(tasks_done)}}
      if frozen is not None:
        tree["frozen"] = frozen
      return tree
    sharding = shd.replicated(self.mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(build))
    if continual_spec:
      abstract["continual"] = checkpointing.abstract_from_spec(continual_spec, sharding)
    return abstract

  # -- Steps ------------------------------------------------------------------

  def _train_fn(self, state: steps.TrainState, head_only: bool):
    """The jitted train step; one per phase kind (jit retraces on new shapes)."""
    key = ("train", head_only)
    if key not in self._jitted:
      self._jitted[key] = steps.jit_train_step(
          self.mesh, shd.state_shardings(self.mesh, state),
          logits_fn=self.classifier.logits,
          optimizer=self.warmup_optimizer if head_only else self.full_optimizer,
          label_smoothing=self.config.train.label_smoothing, head_only=head_only,
          penalty_fn=None if head_only else self.penalty_fn,
          ratio_every=self.config.train.log_every)
    return self._jitted[key]

  def evaluate(self, params, frozen, task: int) -> float:
    """Accuracy of {'backbone', 'head'} of `task` on the task's test set."""
    if "eval" not in self._jitted:
      self._jitted["eval"] = steps.jit_eval_step(
          self.mesh, shd.state_shardings(self.mesh, params),
          logits_fn=self.classifier.logits)
    correct = count = 0.0
    for batch in eval_batches(self.dataset.test, self.splits[task],
                              num_classes_total=self.dataset.num_classes,
                              batch_size=self._per_host(self.config.train.eval_batch_size)):
      out = self._jitted["eval"](params, shd.put_batch(batch, self.mesh), frozen)
      correct += float(out["correct"])
      count += float(out["count"])
    return correct / max(count, 1.0)

  def _per_host(self, global_batch_size: int) -> int:
    return global_batch_size // jax.process_count()

  # -- One training phase -----------------------------------------------------

  def train_phase(self, task: int, params, frozen, carried: dict, *,
                  head_only: bool, num_steps: int, global_step0: int):
    """Runs one phase (head warm-up or full training); returns the params."""
    if num_steps == 0:
      return params, None
    config = self.config
    optimizer = self.warmup_optimizer if head_only else self.full_optimizer
    state = steps.init_train_state(params, optimizer, head_only=head_only)
    if not head_only:
      state = state.replace(opt_state=continual.install_basis(
          config, state.opt_state, carried, params))
    state = jax.device_put(state, shd.state_shardings(self.mesh, state))
    train_fn = self._train_fn(state, head_only)
    phase = 0 if head_only else 1
    data = train_dataset(
        self.dataset.train, self.splits[task],
        num_classes_total=self.dataset.num_classes,
        batch_size=self._per_host(config.train.batch_size),
        seed=_seed(config.seed, 3, task, phase), augment=config.data.augment,
        pad=config.data.pad).to_iter_dataset()
    rng = self._key(4, task, phase)
    prefix = "warmup" if head_only else "train"
    history = []
    tick, tick_step = time.perf_counter(), 0
    for i, batch in zip(range(num_steps), data):
      state, metrics = train_fn(state, shd.put_batch(batch, self.mesh), rng,
                                frozen, carried)
      history.append(metrics)
      global_step = global_step0 + i + 1
      self.report_progress(global_step)
      last = i + 1 == num_steps
      if (i + 1) % config.train.log_every == 0 or last:
        # nanmean: some metrics are computed on a subset of steps only.
        summary = {f"{prefix}/{k}": float(np.nanmean([m[k] for m in history]))
                   for k in history[0]}
        history = []
        summary[f"{prefix}/steps_per_sec"] = (i + 1 - tick_step) / (
            time.perf_counter() - tick)
        tick, tick_step = time.perf_counter(), i + 1
        if not head_only:
          lrs = optimizers.learning_rates(config.optim, num_steps, i)
          summary.update({f"{prefix}/lr_{k}": v for k, v in lrs.items()})
        in_a_row = int(state.nonfinite_in_a_row)
        summary[f"{prefix}/nonfinite_steps"] = int(state.nonfinite_total)
        self.writer.write_scalars(global_step, summary)
        if in_a_row >= config.train.max_nonfinite_steps:
          raise NonFiniteTrainingError(
              f"task {task}, {prefix} step {i + 1}: {in_a_row} steps in a row had "
              "a non-finite loss or update and were skipped; stopping before "
              "anything is checkpointed. Lower the learning rates "
              "(config.optim.backbone_lr / head_lr) or check the data.")
      if not head_only and ((i + 1) % config.train.eval_every == 0 or last):
        accuracy = self.evaluate(state.params, frozen, task)
        self.writer.write_scalars(global_step, {"eval/current_task_accuracy": accuracy})
    return state.params, state.opt_state

  def after_task(self, task: int, params, frozen, carried: dict):
    """The mode's after-task update of the carried state (and its record)."""
    needed = continual.examples_needed(self.config)
    examples = None
    if needed:
      examples = task_examples(self.dataset.train, self.splits[task],
                               num_classes_total=self.dataset.num_classes,
                               num_examples=needed, seed=_seed(self.config.seed, 5, task))
    return continual.after_task(
        self.config, task=task, classifier=self.classifier, params=params,
        frozen=frozen, continual=carried, examples=examples, key=self._key(6, task))


def _check_sizes(run: _Run) -> None:
  """Problem sizes that only the data and model can tell are valid."""
  config = run.config
  smallest = min(len(s.train_indices) for s in run.splits)
  if config.mode == "nostalgia":
    if config.nostalgia.batch_size > smallest:
      raise ValueError(
          f"config.nostalgia.batch_size={config.nostalgia.batch_size} exceeds the "
          f"smallest task's {smallest} training examples: lower it.")
    trainable = jax.eval_shape(lambda: run.init_model()[0])
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    cap = max(config.nostalgia.k, config.nostalgia.max_rank
              if config.nostalgia.merge == "union" else 0)
    if cap >= num_params:
      raise ValueError(
          f"config.nostalgia.k / max_rank ({cap}) must be smaller than the "
          f"number of trainable backbone parameters ({num_params}).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains on every task in sequence and returns the results dict.

  Args:
    config: the experiment config (see configs/default.py).
    workdir: output directory; a finished task's checkpoint there is resumed.
    allow_config_change: resume a workdir written with a different config.

  Returns:
    The content of `workdir/results.json`.
  """
  validate_config(config)
  for name in ("batch_size", "eval_batch_size"):
    shd.check_batch_size(config.train[name], f"config.train.{name}")
  run = _Run(config, workdir)
  _check_sizes(run)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointing.check_workdir_config(workdir, config,
                                     allow_config_change=allow_config_change)
  run.open_writer()
  config_dict = checkpointing.config_to_dict(config)
  manager = checkpointing.make_manager(workdir, config.checkpoint.max_to_keep)

  tasks_done = manager.latest_step() or 0
  if tasks_done:
    meta = checkpointing.restore_meta(manager, tasks_done)
    state = checkpointing.restore_state(
        manager, tasks_done,
        run.abstract_checkpoint(tasks_done, meta.get("continual_spec", {})))
    backbone, frozen, heads = state["backbone"], state.get("frozen"), state["heads"]
    carried = state.get("continual", {})
    accuracy_matrix, task_records = meta["accuracy_matrix"], meta["tasks"]
    logging.info("Resuming %s after task %d of %d.", workdir, tasks_done - 1,
                 run.num_tasks)
  else:
    backbone, frozen = run.init_model()
    heads, accuracy_matrix, task_records = {}, [], []
    carried = continual.initial_state(config, backbone)
    run.writer.write_hparams(
        {k: v for k, v in checkpointing.flatten_dict(config_dict).items()
         if isinstance(v, (int, float, str, bool))})
  logging.info("Mode %s; %d trainable backbone parameters%s.", config.mode,
               tree_math.tree_size(backbone),
               " (LoRA adapters)" if frozen is not None else "")

  results = None
  for task in range(tasks_done, run.num_tasks):
    split = run.splits[task]
    logging.info("Task %d: classes %s (%d train / %d test examples).", task,
                 split.classes, len(split.train_indices), len(split.test_indices))
    task_start = time.perf_counter()
    global_step0 = task * run.steps_per_task
    params = {"backbone": backbone, "head": run.init_head(task)}
    params, _ = run.train_phase(
        task, params, frozen, carried, head_only=True,
        num_steps=config.train.head_warmup_steps, global_step0=global_step0)
    params, opt_state = run.train_phase(
        task, params, frozen, carried, head_only=False,
        num_steps=config.train.steps,
        global_step0=global_step0 + config.train.head_warmup_steps)
    backbone = params["backbone"]
    heads = {**heads, f"task_{task}": params["head"]}
    train_seconds = time.perf_counter() - task_start

    row = [run.evaluate({"backbone": backbone, "head": heads[f"task_{j}"]}, frozen, j)
           for j in range(task + 1)]
    accuracy_matrix.append(row + [None] * (run.num_tasks - task - 1))
    carried, mode_records = run.after_task(task, params, frozen, carried)
    task_records.append({
        "task": task, "classes": list(split.classes),
        "train_examples": int(len(split.train_indices)),
        "test_examples": int(len(split.test_indices)),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - task_start,
        **mode_records,
    })
    saved = {"backbone": backbone, "heads": heads}
    if frozen is not None:
      saved["frozen"] = frozen
    if carried:
      saved["continual"] = carried
    checkpointing.save(
        manager, task + 1, saved, opt_state,
        {"tasks_done": task + 1, "accuracy_matrix": accuracy_matrix,
         "tasks": task_records,
         "continual_spec": checkpointing.tree_spec(carried)})
    results = reporting.results_dict(accuracy_matrix, num_tasks=run.num_tasks,
                                     config=config_dict, tasks=task_records)
    _report_task(run, task, results, global_step=(task + 1) * run.steps_per_task)

  manager.wait_until_finished()
  if results is None:  # Every task was already done: report what was saved.
    results = reporting.results_dict(accuracy_matrix, num_tasks=run.num_tasks,
                                     config=config_dict, tasks=task_records)
    _report_task(run, run.num_tasks - 1, results,
                 global_step=run.num_tasks * run.steps_per_task)
  if not (epath.Path(workdir) / "export").exists():
    path = checkpointing.export_model(
        workdir, run.classifier.export_vit(backbone, frozen), heads)
    logging.info("Final model (plain ViT weights + heads) exported to %s.", path)
  run.writer.flush()
  return results


def _report_task(run: _Run, task: int, results: dict, *, global_step: int):
  """Scalars, images, results.json and plots after `task`."""
  row = results["accuracy_matrix"][task]
  scalars = {f"eval/accuracy_task_{j}": row[j] for j in range(task + 1)}
  scalars.update({f"cl/{k}": results[k] for k in
                  ("average_accuracy", "backward_transfer", "forgetting")
                  if results[k] is not None})
  record = results["tasks"][task].get("curvature")
  if record:
    eigenvalues = np.asarray(record["eigenvalues"])
    scalars.update({"curvature/lambda_max": eigenvalues[0],
                    "curvature/lambda_k": eigenvalues[-1],
                    "curvature/basis_rank": record["basis_rank"],
                    "curvature/batch_hvps": record["batch_hvps"],
                    "curvature/seconds": record["seconds"]})
    run.writer.write_histograms(global_step, {"curvature/eigenvalues": eigenvalues})
  run.writer.write_scalars(global_step, scalars)
  logging.info("After task %d: accuracies %s; %s", task,
               ", ".join(f"{100 * a:.1f}" for a in row[:task + 1]),
               ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if k.startswith("cl/")))
  if jax.process_index() != 0:
    return
  workdir = run.workdir
  reporting.write_json_atomically(f"{workdir}/results.json", results)
  matrix, num_tasks = results["accuracy_matrix"], run.num_tasks
  images = {
      "accuracy_matrix": reporting.figure_to_png(
          reporting.plot_accuracy_matrix(matrix, num_tasks),
          f"{workdir}/accuracy_matrix.png"),
      "task_accuracy": reporting.figure_to_png(
          reporting.plot_task_curves(matrix, num_tasks),
          f"{workdir}/task_accuracy.png"),
  }
  spectra = [t["curvature"]["eigenvalues"] for t in results["tasks"] if "curvature" in t]
  if spectra:
    images["eigenvalue_spectra"] = reporting.figure_to_png(
        reporting.plot_spectra(spectra), f"{workdir}/eigenvalue_spectra.png")
  run.writer.write_images(global_step, {k: v[None] for k, v in images.items()})
