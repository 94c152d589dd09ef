import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed (gloo, world 1) and megatron's parallel state with TP=PP=1."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    from megatron_prores import parallel

    parallel.initialize()
    yield


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Real tokenized data: a 200 kB stdlib corpus, a 600-piece SentencePiece tokenizer and the
    Megatron .bin/.idx pair ``c_text_document``, made by the project's own tools."""
    d = tmp_path_factory.mktemp("ds")
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for cmd in (["build_corpus.py", "--output", d / "c.jsonl", "--max-bytes", "200000"],
                ["train_tokenizer.py", "--input", d / "c.jsonl", "--model-prefix", d / "tok", "--vocab-size", "600"],
                ["preprocess_data.py", "--input", d / "c.jsonl", "--tokenizer-model", d / "tok.model",
                 "--output-prefix", d / "c", "--workers", "1"]):
        subprocess.run([sys.executable, os.path.join(tools, cmd[0]), *map(str, cmd[1:])], check=True,
                       capture_output=True, env=env, timeout=600)
    return d
