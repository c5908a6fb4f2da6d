"""Fixtures for the deploy/ tests: each kustomize overlay rendered once by `kubectl kustomize`."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, Objects, kubectl, render


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def objects(overlay: str) -> Objects:
    if kubectl() is None:
        pytest.skip("kubectl is not installed: cannot render deploy/kustomize (install kubectl >= 1.27, kustomize 5 built in)")
    return Objects(render(overlay))
