"""Sweep definitions in W&B's sweep YAML, and what they mean for the local search engine (Optuna).

A sweep YAML is what ``wandb sweep`` reads:

- ``method``: ``grid``, ``random`` or ``bayes`` (offline: every grid point in order, Optuna's
  ``RandomSampler``, Optuna's ``TPESampler``);
- ``metric``: ``name`` and ``goal`` (``maximize`` / ``minimize``);
- ``parameters``: run-config keys (``data.top_k``, ``model.detector``, ``loao.top_k``...), each with
  ``values``, ``value``, or a ``distribution`` with ``min``/``max`` (and ``q``);
- ``command``: the run, ``[${program}, loao, --config, <run config>, ..., ${args}]``;
- optional ``name``, ``project``, ``entity``, ``run_cap`` (most runs in the whole sweep).

``early_terminate`` (Hyperband) is not applied offline: every run goes to its end.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sahs.errors import UserError

METHODS = ("grid", "random", "bayes")
# W&B distributions that Optuna's samplers can draw (normal ones have no bounded counterpart there).
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values",
                 "q_log_uniform_values", "log_uniform", "q_log_uniform")
PLACEHOLDERS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
                "${args_json_file}", "${args_no_boolean_flags}"}
RUN_VERBS = ("loao",)  # verbs a sweep runs in-process


class SweepError(UserError, ValueError):
    """A sweep definition that cannot run; the message names the key and the fix (``sahs`` prints it in one line)."""


def cli_text(value: Any) -> str:
    """A parameter value as a command-line override value (what W&B's ``${args}`` would pass)."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Parameter:
    """One swept run-config key: a list of values, or a distribution."""

    name: str
    distribution: str
    values: tuple = ()  # constant / categorical
    low: float | None = None
    high: float | None = None
    q: float | None = None

    @property
    def finite(self) -> bool:
        return self.distribution in ("constant", "categorical", "int_uniform", "q_uniform")

    def grid_values(self) -> list[Any]:
        """Every value a grid visits, in order."""
        if self.distribution in ("constant", "categorical"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1, int(self.q or 1)))
        if self.distribution == "q_uniform":
            steps = int(math.floor((self.high - self.low) / self.q + 1e-9))
            return [round(self.low + i * self.q, 12) for i in range(steps + 1)]
        raise SweepError(f"parameter {self.name!r}: a grid needs a finite set of values, not the {self.distribution} "
                         "distribution; give `values: [...]` (or use method random or bayes)")

    def _choices(self) -> list[Any]:
        """Categorical choices as Optuna stores them: scalars as they are, lists and dicts as JSON text."""
        return [v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for v in self.values]

    def _decode(self, choice: Any) -> Any:
        return self.values[self._choices().index(choice)]

    def suggest(self, trial) -> Any:
        """Draw this parameter's value for an Optuna trial (a grid point's enqueued value, when fixed)."""
        d, name = self.distribution, self.name
        if d == "constant":
            return self.values[0]
        if d == "categorical":
            return self._decode(trial.suggest_categorical(name, self._choices()))
        if d == "int_uniform":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.q or 1))
        if d == "uniform":
            return trial.suggest_float(name, self.low, self.high)
        if d == "q_uniform":
            return trial.suggest_float(name, self.low, self.high, step=self.q)
        low, high = (math.exp(self.low), math.exp(self.high)) if d in ("log_uniform", "q_log_uniform") else (
            self.low, self.high)
        value = trial.suggest_float(name, low, high, log=True)
        if self.q:  # Optuna has no quantized log scale: round the draw, as W&B's q_log_uniform does
            value = max(self.q, round(value / self.q) * self.q)
        return value

    def grid_choice(self, value: Any) -> Any:
        """How a grid value is enqueued in Optuna (the inverse of ``suggest``'s decoding)."""
        return self._choices()[self.values.index(value)] if self.distribution == "categorical" else value


def _parameter(name: str, spec: Any) -> Parameter:
    if not isinstance(spec, dict):
        raise SweepError(f"parameter {name!r} must be a mapping such as `values: [...]`, got {spec!r}")
    unknown = set(spec) - {"values", "value", "distribution", "min", "max", "q", "mu", "sigma"}
    if "parameters" in spec:
        raise SweepError(f"parameter {name!r}: nested parameters are not supported; name the full key, e.g. "
                         f"`{name}.<field>`")
    if unknown:
        raise SweepError(f"parameter {name!r} has unknown fields {sorted(unknown)}; use values, value, "
                         "distribution, min, max, q")
    distribution = spec.get("distribution")
    if distribution is None:
        if "values" in spec:
            distribution = "categorical"
        elif "value" in spec:
            distribution = "constant"
        elif {"min", "max"} <= set(spec):
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            distribution = "int_uniform" if both_int else "uniform"
        else:
            raise SweepError(f"parameter {name!r} needs `values`, `value`, or `min` and `max`")
    if distribution not in DISTRIBUTIONS:
        raise SweepError(f"parameter {name!r}: distribution {distribution!r} is not supported offline; "
                         f"use one of {', '.join(DISTRIBUTIONS)}")
    if distribution == "constant":
        if "value" not in spec:
            raise SweepError(f"parameter {name!r}: a constant needs `value`")
        return Parameter(name, distribution, (spec["value"],))
    if distribution == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepError(f"parameter {name!r}: `values` must be a non-empty list, got {values!r}")
        return Parameter(name, distribution, tuple(values))
    try:
        low, high = float(spec["min"]), float(spec["max"])
    except (KeyError, TypeError, ValueError):
        raise SweepError(f"parameter {name!r}: the {distribution} distribution needs numeric `min` and `max`") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SweepError(f"parameter {name!r}: `min` and `max` must be finite numbers, got min={low}, max={high}; "
                         "give the largest value worth trying")
    q = spec.get("q")
    bad_q = q is not None and not (isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q) and q > 0)
    if not low < high or bad_q:
        raise SweepError(f"parameter {name!r}: needs min < max and q > 0, got min={low}, max={high}, q={q}")
    if distribution.startswith("q_") and q is None:
        raise SweepError(f"parameter {name!r}: the {distribution} distribution needs `q`")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
        raise SweepError(f"parameter {name!r}: log_uniform_values needs min > 0, got {low}")
    return Parameter(name, distribution, (), low, high, None if q is None else float(q))


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep YAML."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str  # maximize | minimize
    parameters: list[Parameter]
    verb: str
    run_args: list[str]  # the run's command line after the verb, without W&B placeholders
    project: str = "sahs"
    entity: str | None = None
    run_cap: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point in W&B's order (the product of the parameters in YAML order)."""
        names = [p.name for p in self.parameters]
        return [dict(zip(names, point)) for point in itertools.product(*(p.grid_values() for p in self.parameters))]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """``--key=value`` for each parameter, in YAML order, as W&B's ``${args}`` would pass them."""
        return [f"--{p.name}={cli_text(params[p.name])}" for p in self.parameters if p.name in params]

    def first_point(self) -> dict[str, Any]:
        """Each parameter's first value (or lower bound): one point that every key must accept."""
        point = {}
        for p in self.parameters:
            if p.finite:
                point[p.name] = p.grid_values()[0]
            else:
                point[p.name] = math.exp(p.low) if p.distribution in ("log_uniform", "q_log_uniform") else p.low
        return point


def _command(raw: dict, path: Path) -> tuple[str, list[str]]:
    command = raw.get("command")
    example = "command: [${program}, loao, --config, configs/demo.yaml, ${args}] with program: sahs"
    if not isinstance(command, list) or not command:
        raise SweepError(f"{path}: the sweep needs a `command` naming the run, e.g. `{example}`")
    words = [str(word) for word in command if str(word) not in PLACEHOLDERS]
    if words and words[0] in ("sahs", raw.get("program")):
        words = words[1:]
    if not words or words[0] not in RUN_VERBS:
        raise SweepError(f"{path}: `sahs sweep` runs `sahs {' | '.join(RUN_VERBS)}` in-process, but the command "
                         f"names {words[:1] or 'no verb'}; write `{example}`")
    if "${args}" not in [str(word) for word in command]:
        raise SweepError(f"{path}: the command must end with ${{args}}, where each run's parameters go")
    return words[0], words[1:]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML; every problem is a ``SweepError`` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep definition at {path}; pass a YAML file such as sweeps/demo_capacity.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise SweepError(f"{path} is not valid YAML{line}: {getattr(error, 'problem', error)}; quote values such "
                         "as '${args}' inside [...]") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep definition is a YAML mapping with method, metric, parameters, command")
    if "method" not in raw and {"trainer", "model", "data", "seed_everything"} & set(raw):
        raise SweepError(f"{path} is a run config, not a sweep definition: run it with `sahs loao --config {path}`, "
                         "or sweep it from a YAML such as sweeps/demo_capacity.yaml whose `command` names it")
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: `method` must be one of {', '.join(METHODS)}, got {method!r}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name"):
        raise SweepError(f"{path}: `metric` needs a `name`, e.g. `metric: {{name: loao/auroc_mean, goal: maximize}}`")
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"{path}: `metric.goal` must be maximize or minimize, got {goal!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: `parameters` must map run-config keys to values or distributions")
    for name in parameters:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", str(name)):
            raise SweepError(f"{path}: parameter {name!r} is not a run-config key such as data.top_k")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise SweepError(f"{path}: the sweep `name` {name!r} must be a folder name (letters, digits, . _ -)")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepError(f"{path}: `run_cap` must be a positive integer, got {run_cap!r}")
    verb, run_args = _command(raw, path)
    spec = SweepSpec(path, name, method, str(metric["name"]), goal,
                     [_parameter(str(key), value) for key, value in parameters.items()], verb, run_args,
                     str(raw.get("project") or "sahs"), raw.get("entity"), run_cap, raw)
    if method == "grid":
        spec.grid()  # raises for a parameter without a finite set of values
    return spec


def check_parameters(spec: SweepSpec, parse: Callable[[list[str]], str | None]) -> None:
    """Fail before any run when a parameter names no key of the run config.

    ``parse(overrides)`` parses the run config with these overrides and returns the parser's error, or
    None. Each parameter is added in YAML order with its first value, so that a key under another
    parameter's choice (``model.detector.init_args.hidden`` after ``model.detector``) is checked against
    that choice; the first parameter whose addition fails is the one named.
    """
    point = spec.first_point()
    if parse(spec.overrides(point)) is None:
        return
    for count in range(1, len(spec.parameters) + 1):
        names = {p.name for p in spec.parameters[:count]}
        error = parse(spec.overrides({k: v for k, v in point.items() if k in names}))
        if error is not None:
            bad = spec.parameters[count - 1]
            raise SweepError(f"{spec.path}: sweep parameter {bad.name!r} (value {cli_text(point[bad.name])}) is not "
                             f"accepted by the run config: {error}")
    raise SweepError(f"{spec.path}: the run config rejects the sweep's first point {point}")
