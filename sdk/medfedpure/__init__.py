"""medfedpure — adversarially robust brain-MRI tumour classification at the edge.

Public API (imported lazily so that `import medfedpure` stays cheap and never needs torch):

- ``load_scan(source, *, frame=None) -> Scan`` and ``preprocess(scan, size) -> ndarray``
- ``ScanError`` and its subclasses (bad input)
- ``Defender`` / ``Result`` (the guarded classifier)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_scan": "medfedpure.scan",
    "preprocess": "medfedpure.scan",
    "Scan": "medfedpure.scan",
    "ScanError": "medfedpure.scan",
    "Defender": "medfedpure.runtime.defender",
    "Result": "medfedpure.runtime.defender",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medfedpure' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
