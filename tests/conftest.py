"""Shared fixtures: the real model, a tiny random-weight model, and real servers (tests/harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.inference.weights import pull_default_model
# The server harness lives in tests/harness.py (the benchmark uses it too); these names stay
# importable from here for the tests that import them.
from tests.harness import CACHE_DIR, ROOT, ServerProcess, free_port, wait_until

__all__ = ["CACHE_DIR", "ROOT", "ServerProcess", "free_port", "wait_until"]


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default SmolLM2-135M-Instruct folder (fetched once into the cache)."""
    return pull_default_model(CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random-weight Llama with the real tokenizer: fast, and its output is noise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def real_server(tmp_path_factory, real_model_dir):
    """The real default model behind a real uvicorn server, shared by the e2e tests."""
    server = ServerProcess(tmp_path_factory.mktemp("real-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_model_dir):
    """A real server on the tiny random model: fast, for API behaviour that ignores the text."""
    server = ServerProcess(tmp_path_factory.mktemp("tiny-server"), {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    yield server
    server.stop()
