"""The ``fake`` fixture: a fake training command in the test's own folder (``compare_fake.Fake``)."""

import pytest
from compare_fake import Fake


@pytest.fixture
def fake(tmp_path) -> Fake:
    return Fake(tmp_path)
