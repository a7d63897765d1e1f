"""Training: config schema, model families, frozen parts, train state, optimiser, tasks, sharded steps,
checkpoints, metrics, the loop, runs on disk."""

from starflow2_jax.train.checkpoint import Checkpointer, find_incomplete, load_params
from starflow2_jax.train.config_schema import base_config, validate
from starflow2_jax.train.family import Family
from starflow2_jax.train.frozen import FrozenPart
from starflow2_jax.train.loop import NonFiniteLossError, TrainResult, resolve_config, train
from starflow2_jax.train.optim import decay_mask, guarded_update, learning_rate_schedule, make_optimizer
from starflow2_jax.train.state import TrainState, state_is_finite, tree_all_finite
from starflow2_jax.train.step import (StateShardings, create_state, make_eval_step, make_train_step,
                                      state_shardings)
from starflow2_jax.train.task import SampleGrid, Task, TaskBase
from starflow2_jax.train.tasks import FlowTask, WordVocab, flow_config_from

__all__ = [
    "Checkpointer", "Family", "FlowTask", "FrozenPart", "NonFiniteLossError", "SampleGrid", "StateShardings", "Task", "TaskBase", "TrainResult",
    "TrainState", "WordVocab", "base_config", "create_state", "decay_mask", "find_incomplete", "flow_config_from",
    "guarded_update", "learning_rate_schedule", "load_params", "make_eval_step", "make_optimizer",
    "make_train_step", "resolve_config", "state_is_finite", "state_shardings", "train", "tree_all_finite",
    "validate",
]
