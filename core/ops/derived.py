"""Forms of a weight tensor that the kernels read (transposed, int8, packed), made once.

A layer's weights (the backbone's codes, a task's folded codes) live for many passes;
remaking their kernel forms on every pass would cost more than the small products they
feed. Each form is kept while its source tensor lives and is unchanged (same object,
same in-place version) and dropped when the source is freed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")

_FORMS: dict[tuple[int, Hashable], tuple[weakref.ref[Tensor], int, object]] = {}


def derived(source: Tensor, kind: Hashable, make: Callable[[Tensor], T]) -> T:
    """``make(source)``, kept under ``kind`` while ``source`` lives unchanged."""
    key = (id(source), kind)
    entry = _FORMS.get(key)
    if entry is not None and entry[0]() is source and entry[1] == source._version:
        return entry[2]  # type: ignore[return-value]
    value = make(source)
    _FORMS[key] = (weakref.ref(source, lambda _ref: _FORMS.pop(key, None)), source._version,
                   value)
    return value
