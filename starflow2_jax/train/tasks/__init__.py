"""Concrete ``Task``s (see ``starflow2_jax.train.task``), one module per model family (flows, the FAE
stages; STARFlow2 next). Each module also defines its family (``FAMILY``); ``train.families`` finds
them by name (``families.make_task(config)`` builds the task a config names)."""

from starflow2_jax.train.tasks.flow import FlowTask, flow_config_from
from starflow2_jax.train.tasks.vocab import WordVocab

__all__ = ["FlowTask", "WordVocab", "flow_config_from"]
