"""One searched parameter as a W&B sweep writes it: `value`, `values` (+ `probabilities`), or a
`distribution` over `min`/`max` (+ `q`), and what each search method does with it.

    lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}
    loss: {values: [f1, focal]}
    epochs: {value: 30}
    kfold: {parameters: {k: {value: 5}}}      # nested, the same as `kfold.k: {value: 5}`

Grid takes `values` (and the integers of an `int_uniform`); random draws from every distribution
with a seeded generator; bayes hands the space to Optuna's TPE (see `optuna_distribution`).
"""

from __future__ import annotations

import difflib
import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# W&B's names. `log_uniform` takes natural-log bounds, `log_uniform_values` the values themselves.
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "log_uniform",
)
RANGE_DISTRIBUTIONS = DISTRIBUTIONS[2:]
GRID_MAX_INTEGERS = 1000  # an int_uniform a grid may enumerate


class ParameterError(ValueError):
    """A parameter definition is wrong; the message says which part and how to fix it."""


class Parameter(BaseModel):
    """A parameter's definition; `distribution` is inferred the way W&B infers it when left out."""

    model_config = ConfigDict(extra="forbid")

    value: Any = None
    values: list[Any] | None = None
    probabilities: list[float] | None = None
    distribution: str | None = None
    min: int | float | None = None  # an int stays an int: W&B infers int_uniform from integer bounds
    max: int | float | None = None
    q: float | None = None
    # W&B's normal distributions: accepted by name so the message can say they are not supported.
    mu: float | None = None
    sigma: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _note_value_given(cls, data: Any) -> Any:
        # `value: null` is a real constant; remember that the key was there.
        if isinstance(data, dict) and "value" in data:
            data = dict(data) | {"distribution": data.get("distribution") or "constant"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Parameter:
        if self.mu is not None or self.sigma is not None:
            raise ValueError("normal distributions (mu/sigma) are not supported; use min/max with uniform")
        if self.distribution is None:
            self.distribution = self._inferred()
        name = self.distribution
        if name not in DISTRIBUTIONS:
            close = difflib.get_close_matches(name, DISTRIBUTIONS, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown distribution {name!r}{hint} (choose one of: {', '.join(DISTRIBUTIONS)})")
        if name == "categorical":
            self._check_values()
        elif name in RANGE_DISTRIBUTIONS:
            self._check_range()
        elif self.values is not None or self.min is not None or self.max is not None:
            raise ValueError("give either `value`, `values`, or `min` and `max`, not several")
        return self

    def _inferred(self) -> str:
        if self.values is not None:
            return "categorical"
        if self.min is not None or self.max is not None:
            # W&B: integer bounds mean int_uniform, anything else uniform.
            integers = all(isinstance(bound, int) and not isinstance(bound, bool) for bound in (self.min, self.max))
            return "int_uniform" if integers else "uniform"
        raise ValueError("needs `value`, `values`, or `min` and `max` (W&B sweep syntax)")

    def _check_values(self) -> None:
        if not self.values:
            raise ValueError("`values` is empty: list at least one value")
        if self.min is not None or self.max is not None:
            raise ValueError("give either `values` or `min`/`max`, not both")
        if self.probabilities is not None:
            if len(self.probabilities) != len(self.values):
                raise ValueError(f"{len(self.probabilities)} probabilities for {len(self.values)} values")
            if any(p < 0 for p in self.probabilities) or not math.isclose(sum(self.probabilities), 1.0, abs_tol=1e-6):
                raise ValueError(f"probabilities must be >= 0 and sum to 1 (they sum to {sum(self.probabilities):g})")

    def _check_range(self) -> None:
        name = self.distribution
        if self.values is not None:
            raise ValueError(f"distribution {name} takes `min` and `max`, not `values`")
        if self.min is None or self.max is None:
            raise ValueError(f"distribution {name} needs both `min` and `max`")
        if self.min > self.max or (self.min == self.max and name != "int_uniform"):
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        if name == "int_uniform" and not (float(self.min).is_integer() and float(self.max).is_integer()):
            raise ValueError(f"int_uniform needs integer min and max (got {self.min:g}, {self.max:g})")
        if name.startswith("q_"):
            if self.q is None or self.q <= 0:
                raise ValueError(f"distribution {name} needs a step `q` > 0")
        elif self.q is not None:
            raise ValueError(f"`q` only goes with q_uniform or q_log_uniform_values, not {name}")
        if name in ("log_uniform_values", "q_log_uniform_values") and self.min <= 0:
            raise ValueError(f"{name} needs min > 0 (got {self.min:g}); log_uniform takes natural-log bounds")

    # What each method does with the parameter.

    @property
    def is_constant(self) -> bool:
        return self.distribution == "constant"

    def grid_values(self) -> list[Any]:
        """Every value a grid takes; ParameterError for a continuous distribution."""
        if self.distribution == "constant":
            return [self.value]
        if self.distribution == "categorical":
            return list(self.values)
        if self.distribution == "int_uniform":
            low, high = int(self.min), int(self.max)
            if high - low + 1 > GRID_MAX_INTEGERS:
                raise ParameterError(f"int_uniform {low}..{high} has too many values for a grid; list `values`")
            return list(range(low, high + 1))
        raise ParameterError(
            f"a grid needs `values` (distribution {self.distribution} is continuous): list the values to try, "
            "or use method: random or bayes"
        )

    def draw(self, rng: random.Random) -> Any:
        """One random value, the way W&B's random search draws it."""
        name = self.distribution
        if name == "constant":
            return self.value
        if name == "categorical":
            return rng.choices(self.values, weights=self.probabilities)[0]
        if name == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        if name == "uniform":
            return rng.uniform(self.min, self.max)
        if name == "q_uniform":
            return _quantize(rng.uniform(self.min, self.max), self.q)
        if name == "log_uniform":
            return math.exp(rng.uniform(self.min, self.max))
        value = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        return _quantize(value, self.q) if name == "q_log_uniform_values" else value

    def bounds(self) -> list[Any]:
        """The extreme values (every value, for a categorical): what a spec must accept before a bayes search starts."""
        if self.distribution in ("constant", "categorical"):
            return self.grid_values()
        if self.distribution == "int_uniform":
            return [int(self.min), int(self.max)]
        if self.distribution == "log_uniform":
            return [math.exp(self.min), math.exp(self.max)]
        if self.distribution.startswith("q_"):
            return [_quantize(self.min, self.q), _quantize(self.max, self.q)]
        return [self.min, self.max]

    def optuna_distribution(self) -> tuple[Any, bool]:
        """(Optuna distribution, whether its choices travel as JSON strings) for a bayes search."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        name = self.distribution
        if name == "categorical":
            primitive = all(value is None or isinstance(value, (bool, int, float, str)) for value in self.values)
            if primitive:
                return CategoricalDistribution(self.values), False
            import json

            return CategoricalDistribution([json.dumps(value) for value in self.values]), True
        if name == "int_uniform":
            return IntDistribution(int(self.min), int(self.max)), False
        if name == "uniform":
            return FloatDistribution(self.min, self.max), False
        if name == "q_uniform":
            low, high = math.ceil(self.min / self.q) * self.q, math.floor(self.max / self.q) * self.q
            return FloatDistribution(low, high, step=self.q), False
        if name == "log_uniform_values":
            return FloatDistribution(self.min, self.max, log=True), False
        if name == "log_uniform":
            return FloatDistribution(math.exp(self.min), math.exp(self.max), log=True), False
        raise ParameterError(f"bayes cannot search {name}; use log_uniform_values (or method: random)")


def _quantize(value: float, step: float) -> float:
    # Round to the step, then drop float noise (0.30000000000000004 -> 0.3).
    return float(f"{round(value / step) * step:.12g}")
