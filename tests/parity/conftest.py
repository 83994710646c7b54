"""Parity tests run the reference libraries live; PEFT warns about tiny random models and configs it
cannot find on a hub. Those warnings say nothing about the comparisons, so they are silenced here."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
