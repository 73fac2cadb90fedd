"""The emulated chip serving many tasks: :class:`CrossbarEngine` is the one entry point.

``engine`` is the facade (task registry, prepared-task cache, calls of the shared model);
``programmer`` programs the chip's cells; ``mixed`` plans a batch that mixes tasks;
``costs`` counts a task's operations per image; ``prepared`` is a task decoded once.
"""

from core.engine.engine import BatchResult, CrossbarEngine
from core.engine.prepared import PreparedTask

__all__ = ["BatchResult", "CrossbarEngine", "PreparedTask"]
