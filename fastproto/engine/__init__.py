"""Training and evaluation engine: optimizers and schedules, atomic resumable checkpoints, a deterministic
training loop (AMP, DDP under torchrun), evaluation through :class:`fastproto.metrics.Evaluator`, and reports
(JSON, Markdown, overlay PNGs)."""
from fastproto.engine.checkpoint import (
    CheckpointError,
    export_weights,
    get_rng_state,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    set_rng_state,
)
from fastproto.engine.distributed import (
    EvalSampler,
    LossForward,
    TrainSampler,
    build_eval_loader,
    build_train_loader,
    destroy_distributed,
    dist_info,
    init_distributed,
    unwrap_model,
    wrap_for_training,
)
from fastproto.engine.evaluate import evaluate
from fastproto.engine.optim import OptimConfig, StableAdamW, WarmupCosineLR, build_optimizer
from fastproto.engine.report import markdown_table, overlay, save_png, save_results, write_json
from fastproto.engine.trainer import seed_everything, train

__all__ = [
    "CheckpointError", "EvalSampler", "LossForward", "OptimConfig", "StableAdamW", "TrainSampler", "WarmupCosineLR",
    "build_eval_loader", "build_optimizer", "build_train_loader", "destroy_distributed", "dist_info", "evaluate",
    "export_weights", "get_rng_state", "init_distributed", "load_checkpoint", "load_weights", "markdown_table",
    "overlay", "save_checkpoint", "save_png", "save_results", "seed_everything", "set_rng_state", "train",
    "unwrap_model", "wrap_for_training", "write_json",
]
