import pytest

from tests.helpers import free_port


@pytest.fixture(scope="session")
def world1():
    """Megatron parallel state of one process (gloo), shared by single-process tests."""
    from megatron_ernie.runtime import ParallelLayout, initialize, shutdown

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    initialize(ParallelLayout(), environ=env)
    yield
    shutdown()
