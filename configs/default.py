r"""Default config: 5 label-disjoint tasks of scikit-learn's digits, a pico ViT.

Runs on a laptop CPU in a couple of minutes, no download:

  python main.py --config configs/default.py --workdir runs/default

Variants after ':' (comma-separated):
  tiny      2 tasks, a micro ViT and a few steps (tests, smoke runs).
  seeded    deal classes to tasks in a seeded random order.

Any field can be overridden, e.g. `--config.optim.backbone_lr=0.01`.
"""

import ml_collections

VARIANTS = ("tiny", "seeded")


def get_config(arg: str = ""):
  variants = [v for v in (arg or "").split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; allowed: {VARIANTS}.")

  config = ml_collections.ConfigDict()
  config.seed = 0
  # finetune: plain sequential fine-tuning (the lower bound); nostalgia:
  # updates projected off the curvature of earlier tasks; l2sp, ewc:
  # penalty baselines.
  config.mode = "finetune"

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.num_tasks = 5
  config.data.class_order = "fixed"      # 'fixed' (0,1 | 2,3 | ...) or 'seeded'
  config.data.test_fraction = 0.25       # stratified, fixed by split_seed
  config.data.split_seed = 0
  config.data.augment = "translate"      # none | translate | translate_flip
  config.data.pad = 1                    # max translation in pixels

  config.model = ml_collections.ConfigDict()
  config.model.variant = "pico/2"        # size/patch: mu, pico, Ti, S, B, L
  config.model.pool_type = "tok"         # 'tok' (CLS) or 'gap'
  config.model.representation_size = 0   # 0: no pre_logits layer
  config.model.dropout = 0.0
  config.model.dtype = "float32"         # activations; params stay float32

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"              # sgd | adam | adamw
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.backbone_lr = 0.03
  config.optim.head_lr = 0.1
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64           # global, over all devices and hosts
  config.train.eval_batch_size = 256
  config.train.head_warmup_steps = 30
  config.train.steps = 300               # full-training steps per task
  config.train.label_smoothing = 0.0
  config.train.eval_every = 100          # evaluate the current task
  config.train.log_every = 50
  config.train.max_nonfinite_steps = 20  # skipped steps in a row before stopping

  # Nostalgia (mode='nostalgia'): after each task, the top-k eigenpairs of the
  # task-loss curvature w.r.t. the trainable backbone, merged into a basis U;
  # later tasks train with updates projected onto U's orthogonal complement.
  config.nostalgia = ml_collections.ConfigDict()
  config.nostalgia.k = 16                  # eigenpairs per task
  config.nostalgia.num_iters = 0           # Lanczos steps m >= k; 0: default
  config.nostalgia.curvature = "hessian"   # hessian | ggn
  config.nostalgia.estimator = "mean_hessian"  # mean_hessian | per_batch
  config.nostalgia.num_batches = 4         # fixed batches averaged (N)
  config.nostalgia.batch_size = 64
  config.nostalgia.merge = "average"       # average | union
  config.nostalgia.ema_rate = 0.0          # average: 0 = equal task weights
  config.nostalgia.max_rank = 80           # union: cap on the basis rank
  config.nostalgia.union_tol = 1e-2        # union: drop near-dependent dirs
  config.nostalgia.union_priority = "old_first"  # old_first | eigenvalue
  config.nostalgia.soft = False            # scale by lambda/(median+lambda)
  config.nostalgia.placement = "auto"      # auto | before | after the optimizer
  config.nostalgia.basis_dtype = "float32"  # float32 | bfloat16 storage

  # L2-SP (mode='l2sp'): alpha/2 ||w - w0||^2 + beta/2 ||head||^2.
  config.l2sp = ml_collections.ConfigDict()
  config.l2sp.alpha = 0.1
  config.l2sp.beta = 0.001

  # EWC (mode='ewc'): strength/2 sum F (w - w*)^2, online Fisher.
  config.ewc = ml_collections.ConfigDict()
  config.ewc.strength = 30.0              # 100 diverged (SGD, summed Fisher): see README
  config.ewc.gamma = 1.0                   # F <- gamma F + F_t
  config.ewc.num_examples = 256
  config.ewc.batch_size = 32               # examples per per-example-grad chunk
  config.ewc.fisher_labels = "sampled"     # sampled (true Fisher) | true

  # LoRA adapters: base ViT frozen, adapters (and heads) train; Nostalgia's
  # curvature and projection then live in adapter space.
  config.lora = ml_collections.ConfigDict()
  config.lora.enabled = False
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.0
  config.lora.targets = "query,key,value"  # also: out, mlp

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.max_to_keep = 2      # 0 keeps every task's checkpoint

  if "tiny" in variants:
    config.data.num_tasks = 2
    config.model.variant = "mu/4"
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.head_warmup_steps = 5
    config.train.steps = 40
    config.optim.warmup_steps = 5
    config.train.eval_every = 20
    config.train.log_every = 10
  if "seeded" in variants:
    config.data.class_order = "seeded"
  return config
