"""The fixtures: ``fake``, a fake training command in the test's own folder (``compare_fake.Fake``), and
``fake_launcher``, the stand-in for ``fam-hf launch`` as compare's launcher (``compare_fake.FakeLauncher``)."""

import pytest
from compare_fake import Fake, FakeLauncher


@pytest.fixture
def fake(tmp_path) -> Fake:
    return Fake(tmp_path)


@pytest.fixture
def fake_launcher(tmp_path, monkeypatch) -> FakeLauncher:
    return FakeLauncher(tmp_path / "fakelib", monkeypatch)
