"""Every test collected under tests/integration/ gets the `integration` marker; the
`local_stack` and `stack_endpoints` fixtures (the real Kafka, S3 and Redis of
deploy/local/stack.py, one per session) are in tests/conftest.py, shared with tests/chaos.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        try:
            p = Path(str(item.fspath)).resolve()
        except OSError:
            continue
        if here in p.parents:
            item.add_marker(pytest.mark.integration)


# The issuer role's services (tests/integration/test_issuer_role.py), each started once per
# session by the project's own scripts and stopped at its end. Their ports sit in the local
# stack's port span, at the offsets deploy/local/ports.py reserves for them.


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory):
    """The real OIDC provider of deploy/local/oidc_provider.py (npm oidc-provider)."""
    from deploy.local.oidc_provider import OidcProvider
    from deploy.local.ports import OIDC_PROVIDER_OFFSET, default_base_port

    provider = OidcProvider(tmp_path_factory.mktemp("oidc-provider"),
                            default_base_port() + OIDC_PROVIDER_OFFSET)
    provider.up()
    try:
        yield provider
    finally:
        provider.down()


@pytest.fixture(scope="session")
def issuer_postgres():
    """A private PostgreSQL cluster (deploy/local/postgres.py), wiped at the session's end."""
    import shutil
    import tempfile

    from deploy.local.ports import ISSUER_POSTGRES_OFFSET, default_base_port
    from deploy.local.postgres import PostgresCluster

    # Not under tmp_path_factory: its directories are 0700 root, and the server runs as the
    # postgres user when the tests run as root.
    parent = Path(tempfile.mkdtemp(prefix="votes-issuer-pg-"))
    parent.chmod(0o755)
    cluster = PostgresCluster(parent / "data", default_base_port() + ISSUER_POSTGRES_OFFSET)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down(wipe=True)
        shutil.rmtree(parent, ignore_errors=True)
