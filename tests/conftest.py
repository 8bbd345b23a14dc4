"""Shared test fixtures."""
from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data beside the repo, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent: these tests read the paper's datasets from ../shared/data beside the repo")
    return SHARED_DATA
