"""Concrete ``Task``s (see ``starflow2_jax.train.task``): flows now; FAE and STARFlow2 later."""

from starflow2_jax.train.tasks.flow import FlowTask, flow_config_from
from starflow2_jax.train.tasks.vocab import WordVocab

__all__ = ["FlowTask", "WordVocab", "flow_config_from"]
