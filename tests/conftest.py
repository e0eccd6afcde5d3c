import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Under pytest-xdist each worker gets one thread: two workers of two threads on two cores stall each other.
_default_threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(int(os.environ.get("CASP_TEST_THREADS", _default_threads)))


@pytest.fixture(autouse=True)
def own_plan_cache_and_threads(tmp_path, monkeypatch):
    """Each test has its own plan cache (a CLI run never reuses another test's plan), and a CLI run's
    `--threads` default does not outlive the test."""
    monkeypatch.setenv("CASP_PLAN_CACHE", str(tmp_path / "plans"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capfd):
    """Run `casp ARGS...` in this process, as the command would run: returncode, stdout and stderr. The
    process-wide settings `main` changes (transformers' verbosity and progress bars) are given back."""
    import subprocess

    import transformers

    from casp.cli import main

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capfd.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refuses a flag this way
            rc = e.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["casp", *argv], rc, out, err)

    yield run
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA in HF layout with the embedded tokenizer/processor (hidden 64, 2 layers)."""
    from casp.embedded.build import build_config, build_model, build_processor

    out = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    cfg = build_config(vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2,
                       lm_hidden=128, lm_intermediate=192, lm_layers=2, lm_heads=4, lm_kv_heads=2)
    build_model(cfg).save_pretrained(out)
    build_processor().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM with the embedded word-level tokenizer."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), hidden=128, intermediate=192, layers=2, kv_heads=2,
                           max_positions=256)


@pytest.fixture(scope="session")
def scene_text(tmp_path_factory) -> Path:
    """A text file in the tiny tokenizer's vocabulary (captions of training scenes)."""
    from casp.embedded.scenes import iter_scenes

    path = tmp_path_factory.mktemp("text") / "captions.txt"
    path.write_text("\n".join(s.caption for s in iter_scenes("train", 300)))
    return path


@pytest.fixture(scope="session")
def scene_jsonl(tmp_path_factory) -> Path:
    from casp.embedded.scenes import write_jsonl

    return write_jsonl("validation", 8, tmp_path_factory.mktemp("jsonl"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a shared 2-core machine, two torch threads stall each other badly; one does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
