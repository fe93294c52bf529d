import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))  # recipes/ is importable as a package in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Distributed tests are slow too, so `pytest -m "not slow"` is the one switch for the fast part."""
    for item in items:
        if item.get_closest_marker("distributed") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine a second thread can make torch
    20x slower (OpenMP hand-offs); one thread also makes results bitwise comparable with 1-thread subprocesses.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """An unconditional tiny EDM teacher folder, built once per session (tests only read it)."""
    from tiny_models import tiny_edm_teacher

    return tiny_edm_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def class_teacher_dir(tmp_path_factory):
    """A 10-class tiny EDM teacher folder (null class 10), built once per session."""
    from tiny_models import tiny_edm_teacher

    return tiny_edm_teacher(tmp_path_factory.mktemp("teacher_c"), num_classes=10)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Factory: ``tiny_pipeline_dir("sdxl")`` is the folder of that family's tiny random-weight pipeline
    (families in ``tiny_pipelines.FAMILIES``), built on first use and shared for the session; tests only read it."""
    from tiny_pipelines import FAMILIES

    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
        if family not in built:
            built[family] = FAMILIES[family](tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return folder
