"""`require`, the one gate for what a machine may lack: a skip with its reason on a user's machine, a
failure under CI=true (a CI run that skipped the browser or the photo set would pass without testing)."""

import conftest
import pytest
from _pytest.outcomes import Failed, Skipped
from conftest import require


def test_missing_prerequisite_skips_with_its_reason(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(Skipped, match="needs chromium"):
        require(False, "needs chromium")
    require(True, "never raised")


def test_missing_prerequisite_fails_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(Failed, match="CI=true and a prerequisite is missing: needs chromium"):
        require(False, "needs chromium")
