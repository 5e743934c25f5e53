"""What the whole suite shares: the markers that split it, and Hypothesis without clocks.

Markers (registered in ``pyproject.toml``), set here and nowhere else, so a file never has
to remember to carry them:

* ``slow``: the fault tests (``test_fault_*``: a thousand dropped connections, database
  restarts and kills under load), ``test_properties`` (10,000 cases a property), and any
  other property test that runs 500 generated cases or more. Together they are most of
  the run's time; ``make test-quick`` leaves them out, ``make test-slow`` runs only them.
* ``daemon``: tests that start the *installed* daemon (twistd, ``dpvoip``) in a
  subprocess: they need ``tools/bootstrap dev`` after a code change, and are slow too.

``make test`` runs everything, markers or not.

Hypothesis: no test may fail because the machine is busy, and Hypothesis has two clocks
of its own: the per-example ``deadline`` (200 ms by default) and the ``too_slow`` health
check on data generation. Both are off for the whole suite (a test that sets its own
``settings`` inherits this profile for what it does not set).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, is_hypothesis_test, settings

settings.register_profile("dpvoip", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dpvoip")

#: Modules whose every test is slow.
SLOW_PREFIXES = ("test_fault_", "test_properties", "test_deploy")
#: Modules whose tests run the installed daemon in a subprocess.
DAEMON_MODULES = frozenset({"test_daemon", "test_fault_kill", "test_fault_sigterm_replay",
                            "test_daemon_instance", "test_check_daemon",
                            "test_live_page_daemon", "test_box_leadership_daemons"})
#: A property test with at least this many cases is slow wherever it lives.
MANY_EXAMPLES = 500


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def _examples(item: pytest.Item) -> int:
    """How many cases Hypothesis runs for this test (0: not a property test)."""
    test = getattr(item, "obj", None)
    if test is None or not is_hypothesis_test(test):
        return 0
    # Hypothesis has no public reader for a test's settings; read the one attribute it
    # keeps them in directly, so that a rename fails here loudly instead of unmarking.
    return int(test._hypothesis_internal_use_settings.max_examples)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = _module(item)
        if module.startswith(SLOW_PREFIXES) or _examples(item) >= MANY_EXAMPLES:
            item.add_marker(pytest.mark.slow)
        if module in DAEMON_MODULES:
            item.add_marker(pytest.mark.daemon)
