import os
import socket
import subprocess
import sys

import pytest


def kill_process_tree(p):
    """SIGKILL ``p`` and every process under it (torchrun's ranks may sit in sessions of their own)."""
    import psutil

    try:
        procs = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in [*procs, psutil.Process(p.pid) if p.poll() is None else None]:
        try:
            proc and proc.kill()
        except psutil.NoSuchProcess:
            pass


def finish(p, timeout):
    """``p.communicate(timeout=...)``; past the timeout ``p`` and all its children are killed (a hung
    driver would otherwise hold a core through the rest of the suite) and the test fails, showing the
    end of what the process wrote."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(p)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process that escaped still holds the pipes
            p.kill()
            out, err = "(its output could not be read: a process outside its tree holds the pipe)", ""
        pytest.fail(f"{p.args!r:.300} ran past {timeout} s; killed with its children. Its output ends:\n"
                    f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}", pytrace=False)


def run_tree(cmd, timeout, **popen):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` that kills the whole
    process tree on a timeout (``subprocess.run`` kills the child only: torchrun's ranks ran on)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    out, err = finish(p, timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


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
