import pytest

from tests.multihost import netns


@pytest.fixture
def needs_netns() -> None:
    """Skips the test, with the one-line reason, where network namespaces cannot be made."""
    netns.require()
