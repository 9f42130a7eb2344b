"""wiremesh.lab.kube: the API server the operator tests run against starts, serves and leaves
nothing behind."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from wiremesh.lab import kube

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 if kube.is_built() else kube.BUILD_TIMEOUT + 300)]


def test_go_module_replaces_every_staging_module_with_its_published_version():
    text = kube.go_mod_text()
    assert f"require k8s.io/kubernetes {kube.KUBE_VERSION}" in text
    assert f"k8s.io/client-go => k8s.io/client-go {kube.STAGING_VERSION}" in text
    assert text.count(" => ") == len(kube.STAGING_MODULES)


def test_api_server_answers_with_its_token_and_is_gone_after_the_context():
    with kube.KubeAPIServer() as server:
        request = urllib.request.Request(
            f"{server.url}/version", headers={"Authorization": f"Bearer {server.token}"}
        )
        with urllib.request.urlopen(request, timeout=10, context=server.ssl_context()) as response:
            assert response.status == 200
        processes = [server.apiserver, server.etcd]
        directory = server.dir
    assert directory is not None and not directory.exists()
    assert all(p is not None and p.returncode is not None for p in processes)  # exited and reaped


def test_api_server_refuses_a_wrong_token():
    with kube.KubeAPIServer() as server:
        request = urllib.request.Request(
            f"{server.url}/api", headers={"Authorization": "Bearer not-the-token"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10, context=server.ssl_context())
        assert refused.value.code == 401
