"""Search methods behind one interface (schedule_search.methods.base), one module per method.

Importing this package registers every method; `get_method(name)` is the way in.
"""

from __future__ import annotations

from schedule_search.methods import asha, bayes, grid, random
from schedule_search.methods.base import METHODS, Expansion, SearchMethod, get_method, keeps_space, register_method

__all__ = [
    "METHODS",
    "Expansion",
    "SearchMethod",
    "asha",
    "bayes",
    "get_method",
    "grid",
    "keeps_space",
    "random",
    "register_method",
]
