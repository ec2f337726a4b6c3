"""Shared fixtures: tiny models and a byte tokenizer built in-process (no network, ever)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from promptkd.testing import byte_tokenizer, save_tiny_pair, tiny_llama, write_tiny_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot
torch.set_num_threads(1)



def _pin_precision_probe() -> None:
    """`mixed_precision: auto` must choose the same on every CPU the suite runs on: the bf16
    probe's cached answer (promptkd.precision) is injected as "emulated" (so auto = float32),
    in a cache directory of the test session's own, which subprocesses inherit. Tests of the
    decision itself inject their own answer."""
    import atexit
    import json
    import shutil
    import tempfile

    from promptkd import precision

    cache = Path(tempfile.mkdtemp(prefix="promptkd-test-cache-"))
    (cache / precision.CACHE_FILE).write_text(json.dumps({precision.machine_key(): 40.0}), encoding="utf-8")
    os.environ["PROMPTKD_CACHE"] = str(cache)
    atexit.register(shutil.rmtree, cache, True)


_pin_precision_probe()

# torch.compile's on-disk cache does not tell kernels built for one vector ISA from another: a
# suite run with ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, emulated) on a machine whose native
# runs share /tmp/torchinductor_<user> read each other's kernels and got wrong divergences and
# heap corruption. An emulated ISA gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def teacher_model():
    return tiny_llama(num_layers=4, seed=0)


@pytest.fixture
def student_model():
    return tiny_llama(num_layers=2, seed=1)


@pytest.fixture
def tiny_pair_dirs(tmp_path):
    return save_tiny_pair(tmp_path / "models")


@pytest.fixture
def tiny_jsonl(tmp_path):
    return write_tiny_jsonl(tmp_path / "data" / "train.jsonl", 16)


def pytest_configure(config):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: on shared cores OpenMP barriers make tiny
    ops far slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
