"""Concrete ``Task``s (see ``starflow2_jax.train.task``): flows, the FAE stages; STARFlow2 later."""

from starflow2_jax.train.config_schema import FAMILIES
from starflow2_jax.train.tasks.flow import FlowTask, flow_config_from
from starflow2_jax.train.tasks.vocab import WordVocab


def task_from_config(config):
    """The task ``config.model.family`` names: 'flow' → ``FlowTask``, 'fae' → ``FAETask``."""
    family = config.model.family
    if family == "flow":
        return FlowTask.from_config(config)
    if family == "fae":
        from starflow2_jax.train.tasks.fae import FAETask  # imports the DINOv2 / FAE models

        return FAETask.from_config(config)
    raise ValueError(f"model.family={family!r}: expected one of {FAMILIES}")


__all__ = ["FAMILIES", "FlowTask", "WordVocab", "flow_config_from", "task_from_config"]
