"""pytest's fixtures and hooks; the shared helpers live in tests/helpers.py.

Two tiers.  Tests marked `kernel` need root and tracefs/perf, or write other
processes' memory; everything else is the root-free tier, `pytest -m "not
kernel"`, which runs in seconds as any user, from a checkout that user cannot
write to (the fixtures are then built under $SDTRACE_TEST_BUILD or a temporary
directory, and hypothesis keeps no example database).

Kernel tests guard the kernel: tracefs is mounted if it is missing, and the
session fails if it leaves sdtrace_ uprobe events behind.  Without root they
skip.  Under CI=true or SDTRACE_NO_SKIP=1 a skip is a failure: on the machine
.ci/run prepares, every prerequisite of every test is there.
"""
import os
import subprocess
import warnings

import hypothesis
import pytest

from helpers import (OPT_LEVELS, REPOSITORY, UPROBE_EVENTS, FixturePrograms, build_fixtures,
                     build_sdt_program, held_by_another_session, mount_tracefs,
                     sdtrace_uprobe_events)

from sdtrace.kernel import tracefs

# Tests run a SemaphoreManager in this process: its watcher thread answers the
# fanotify permission events of the fixture files.  A vforked child that execs
# such a file waits in exec for that answer while the parent thread, suspended
# by vfork, still holds the GIL the watcher needs: a deadlock (seen once in
# test_shared_and_per_site_semaphores).  Plain fork leaves the parent running.
subprocess._USE_VFORK = False

NO_SKIP = os.environ.get("SDTRACE_NO_SKIP", "") not in ("", "0") or os.environ.get("CI") == "true"

if not os.access(os.getcwd(), os.W_OK) or not os.access(REPOSITORY, os.W_OK):
    hypothesis.settings.register_profile("read-only-checkout", database=None)
    hypothesis.settings.load_profile("read-only-checkout")


def _skip_is_failure(report):
    """Under NO_SKIP, turns a skip (not an xfail) into a failure naming its reason."""
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and skips are failures here (SDTRACE_NO_SKIP/CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_is_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_is_failure(outcome.get_result())


@pytest.fixture(scope="session")
def fixtures():
    build_fixtures()
    return FixturePrograms()


@pytest.fixture(scope="session")
def java_classes():
    """The directory of the compiled tests/fixtures/java programs (a -cp for java)."""
    from helpers import build_java_fixtures

    return build_java_fixtures()


@pytest.fixture(params=OPT_LEVELS)
def opt(request):
    """Runs a test once per optimisation level the fixtures are built at."""
    return request.param


@pytest.fixture(params=("bpf", "tracefs"))
def executor(request, monkeypatch):
    """Runs a tracing test once per executor: its name, for a Session in this process,
    and $SDTRACE_EXECUTOR (the CLI's default --executor) for the sdtrace it runs.

    A tracing module says ``pytestmark = pytest.mark.usefixtures("executor")``; a test
    of one executor alone parametrizes it: ``@pytest.mark.parametrize("executor",
    ["tracefs"], indirect=True)``."""
    monkeypatch.setenv("SDTRACE_EXECUTOR", request.param)
    return request.param


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """helpers.SDT_PROGRAM, compiled, with its site and semaphore offsets from readelf."""
    return build_sdt_program(str(tmp_path_factory.mktemp("sdt")))


@pytest.fixture
def group():
    """A fresh session group, removed after the test whatever happened."""
    name = tracefs.new_group()
    try:
        yield name
    finally:
        tracefs.remove_group(name)


@pytest.fixture(autouse=True)
def kernel_tier(request):
    """Gives a `kernel` test root and a guarded kernel; other tests get nothing."""
    if request.node.get_closest_marker("kernel") is None:
        return
    if os.geteuid() != 0:
        pytest.skip("a kernel test: needs root")
    request.getfixturevalue("no_uprobe_leftovers")


@pytest.fixture(scope="session")
def no_uprobe_leftovers():
    """Fails the session if it ends with sdtrace_ uprobe events it left behind.

    Events already defined when the session starts (left by an earlier run)
    only produce a warning, and events a concurrent session still holds are
    not this one's, so the check also holds under pytest-xdist.
    """
    mount_tracefs()
    before = sdtrace_uprobe_events()
    stale = [line for line, group in before.items() if not held_by_another_session(group)]
    if stale:
        warnings.warn(f"{UPROBE_EVENTS} held sdtrace_ events before the tests ran: {stale}")
    yield
    leaked = [line for line, group in sdtrace_uprobe_events().items()
              if line not in before and not held_by_another_session(group)]
    if leaked:
        pytest.fail(f"the tests left {len(leaked)} sdtrace_ uprobe event(s) in {UPROBE_EVENTS}:\n"
                    + "\n".join(leaked), pytrace=False)
