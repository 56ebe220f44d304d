"""Shared test fixtures: paths to ../shared/data (skipped with a reason when absent) and tiny random models."""

import os
import pathlib

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no GPU; this must be set before
# triton is first imported anywhere in the test process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest.ini runs the suite in two worker processes; each keeps to one thread, as two processes of two threads
# each on two cores would spin against each other. (Tests of the kernels' thread splits set their own counts.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test material not found: {path} (a fresh clone has no ../shared)")
    return path


@pytest.fixture
def stories_dir():
    return shared_path("stories260K")


@pytest.fixture
def codellama_tokenizer_path():
    return shared_path("tokenizers", "codellama-like.model")


@pytest.fixture
def llama2_tokenizer_path():
    return shared_path("tokenizers", "llama2.model")
