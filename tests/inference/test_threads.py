"""Torch work outside the engine runs in a thread that ends with it (app/inference/threads.py)."""

from __future__ import annotations

import threading

import pytest

from app.inference import model as model_mod
from app.inference.threads import in_passing_thread


def test_in_passing_thread_returns_the_result_from_another_thread_that_has_ended():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_in_passing_thread_raises_the_exception_in_the_caller():
    def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        in_passing_thread(fail)


def test_load_model_loads_off_the_calling_thread(monkeypatch, tmp_path):
    where = []
    monkeypatch.setattr(model_mod, "_load_model", lambda *a: where.append(threading.current_thread()) or "lm")
    assert model_mod.load_model(tmp_path) == "lm"
    assert where[0] is not threading.current_thread()
