"""Test-session hygiene shared by every test module."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each module: a whole run compiles thousands of CPU executables, each
    holding its own memory mappings, and one process would otherwise keep all of them (the kernel's limit on
    mappings per process, 65530 by default, is what a long run reaches first)."""
    yield
    jax.clear_caches()
