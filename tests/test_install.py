"""After the README's install, the numpy-2 stack still imports: the sweep engine (Optuna) caps nothing.

W&B's own local sweep engine (the `sweeps` package) declares numpy<2; `pip install sweeps` would
replace numpy 2 with 1.26 under datasets and pandas. This walks what sahs requires, as installed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.version import Version


def requirement_tree(name: str, extras: tuple[str, ...] = ()) -> dict[str, list[Requirement]]:
    """Every installed distribution sahs pulls in, with the requirements that name it."""
    seen: dict[str, list[Requirement]] = {}
    todo = [(name, extras)]
    while todo:
        dist, wanted = todo.pop()
        for text in metadata.requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                continue
            key = req.name.lower().replace("_", "-")
            first = key not in seen
            seen.setdefault(key, []).append(req)
            if first:
                try:
                    metadata.distribution(req.name)
                except metadata.PackageNotFoundError:
                    continue
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_nothing_sahs_installs_caps_numpy_below_2_and_the_data_stack_imports():
    tree = requirement_tree("sahs", ("test",))
    assert "optuna" in tree and "sweeps" not in tree
    numpy = Version(metadata.version("numpy"))
    assert numpy.major >= 2
    capped = [str(req) for req in tree.get("numpy", []) if not req.specifier.contains(numpy, prereleases=True)]
    assert not capped, f"requirements that exclude the installed numpy {numpy}: {capped}"
    code = "import numpy, datasets, pandas, optuna; assert int(numpy.__version__.split('.')[0]) >= 2, numpy.__version__"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
