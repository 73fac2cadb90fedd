"""Learning methods that adapt the frozen crossbar backbone to new tasks.

Every method returns the same typed :class:`core.task_state.TaskState` the
engine serves (fp32 fine-tuning excepted: an accuracy upper bound only).
"""

from core.learning.common import AdaptationResult, RunOptions, TrainConfig, TrainingCancelled
from core.learning.registry import METHODS, adapt, default_config, method_names

__all__ = [
    "METHODS",
    "AdaptationResult",
    "RunOptions",
    "TrainConfig",
    "TrainingCancelled",
    "adapt",
    "default_config",
    "method_names",
]
