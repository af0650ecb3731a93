"""The indexer keeps OpenMP's idle threads from spinning long (a loaded build was 7.7x slower with
libgomp's default spin): the setting is made before torch loads, and a user's own setting wins."""
from __future__ import annotations

import subprocess
import sys

import pytest

from .support import REPO, subprocess_env

CODE = ("import os, sys\n"
        "import indexer\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))\n")


@pytest.mark.parametrize("given,expected", [(None, "10000"), ("5", "5")])
def test_indexer_sets_a_short_openmp_spin_before_torch_loads(given, expected):
    env = subprocess_env()
    env.pop("GOMP_SPINCOUNT", None)
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    # the first statement of the package: nothing (torch included) is imported before it
    first = (REPO / "indexer" / "__init__.py").read_text().split('"""', 2)[2].strip().splitlines()
    assert first[0] == "import os" and any("GOMP_SPINCOUNT" in line for line in first[:12])
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
