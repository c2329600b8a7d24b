"""Shared pytest set-up: ``tests/`` on ``sys.path`` (for ``helpers``), and the skip-or-fail rule for tests whose
environment may be missing (root, mounts, a cluster).

On a developer's machine such a test skips with its reason. Under CI (``CI=true``, or ``CNNSCALE_REQUIRE_SLURM=1``,
which ``launch/test.sh`` sets under CI) the same missing environment is a failure, so CI never reports a skip as a
pass.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["environment_required", "skip_or_fail"]


def environment_required() -> bool:
    """True under CI (``CI=true`` or ``CNNSCALE_REQUIRE_SLURM=1``): a test's missing environment is then a failure."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("CNNSCALE_REQUIRE_SLURM") == "1"


def _skip_or_fail(reason: str) -> NoReturn:
    if environment_required():
        pytest.fail(f"required under CI (CI=true or CNNSCALE_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def skip_or_fail() -> Callable[[str], NoReturn]:
    """``skip_or_fail(reason)``: skip with ``reason`` on a dev box, fail with it under CI."""
    return _skip_or_fail
