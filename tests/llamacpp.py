"""The llama.cpp runtime for the tests that run GGUF files in llama.cpp itself: present after
scripts/setup.sh (scripts/setup_llamacpp.sh). Without it such a test skips with the one-line reason,
except under CI (CI=true), where a missing runtime is a failure: CI must run these checks."""

import os

import pytest

from qlora_cli.export import llamacpp


@pytest.fixture(scope="session")
def llamacpp_runtime():
    ready, reason = llamacpp.available()
    if not ready:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the llama.cpp checks: {reason}")
        pytest.skip(reason)
    return llamacpp
