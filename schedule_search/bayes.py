"""Bayes search: the space goes to Optuna's TPE, and each point is sampled when a worker starts it.

`run_cap` trial slots are published at once. When a worker takes one, it asks the search's
study (journal storage in Redis, shared by every worker) for params: TPE models every finished
trial and, with `constant_liar`, the running ones, so parallel workers spread out instead of
sampling the same spot. No process has to stay up to drive the search.

Optuna is imported here, so only bayes searches pay for it at publish time.
"""

from __future__ import annotations

from typing import Any

from contracts.search_payload import BayesSettings
from schedule_search.parameters import Parameter, ParameterError

MAX_STARTUP_TRIALS = 10  # Optuna's default; fewer for small searches so TPE gets to work


def startup_trials(run_cap: int) -> int:
    """Random trials before TPE takes over: a quarter of the search, between 2 and 10."""
    return max(2, min(MAX_STARTUP_TRIALS, run_cap // 4))


def bayes_settings(parameters: dict[str, Parameter], run_cap: int, seed: int) -> BayesSettings:
    """The searched parameters as Optuna distributions (JSON), with TPE's seed and startup count."""
    try:
        from optuna.distributions import distribution_to_json
    except ImportError:
        raise ParameterError("a bayes search needs Optuna on this box: pip install 'runyard[search]'") from None

    space, json_params, errors = {}, [], []
    for name, parameter in parameters.items():
        try:
            distribution, as_json = parameter.optuna_distribution()
        except ParameterError as error:
            errors.append(f"parameters.{name}: {error}")
            continue
        space[name] = distribution_to_json(distribution)
        if as_json:
            json_params.append(name)
    if errors:
        raise ParameterError("\n".join(errors))
    return BayesSettings(space=space, json_params=json_params, seed=seed, n_startup_trials=startup_trials(run_cap))


def corner_points(parameters: dict[str, Parameter]) -> list[dict[str, Any]]:
    """Params a bayes spec must accept before the search starts: each bound alone, all low, all high."""
    bounds = {name: parameter.bounds() for name, parameter in parameters.items()}
    corners = [
        {name: values[0] for name, values in bounds.items()},
        {name: values[-1] for name, values in bounds.items()},
    ]
    for name, values in bounds.items():
        corners += [{name: value} for value in values]
    return corners
