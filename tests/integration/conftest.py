"""Fixtures of the server tests: one LSTM model directory and a real server on port 0 per module."""

from __future__ import annotations

import pytest

from tests.serving_support import RunningServer, server_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("lstm")


@pytest.fixture(scope="module")
def server(model_dir):
    with RunningServer(server_config(str(model_dir))) as s:
        yield s
