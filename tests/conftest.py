"""Shared fixtures. Test data is small and generated, never downloaded."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers import make_shards  # noqa: E402

# Server fixtures (nginx, http.server, SeaweedFS, moto) for every test module.
pytest_plugins = ("tests.servers",)


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> list[str]:
    """Five shards of uneven sizes (one empty), 64 samples with tiny JPEGs."""
    dest = tmp_path_factory.mktemp("uneven")
    return make_shards(str(dest), [17, 1, 0, 30, 16], image=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """An ImageFolder tree: 3 classes, 45 small photo-like JPEGs."""
    from shardkit.cli.synthetic import make_image_folder

    root = str(tmp_path_factory.mktemp("imgs"))
    make_image_folder(root, count=45, classes=3, size=(96, 72), workers=2)
    return root
