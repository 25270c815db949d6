"""pytest's fixtures and hooks; the shared helpers live in tests/helpers.py.

The session guards the kernel: tracefs is mounted if it is missing, and the
session fails if it leaves sdtrace_ uprobe events behind.
"""
import warnings

import pytest

from helpers import (OPT_LEVELS, UPROBE_EVENTS, FixturePrograms, build_fixtures,
                     build_sdt_program, held_by_another_session, mount_tracefs,
                     sdtrace_uprobe_events)

from sdtrace.kernel import tracefs


@pytest.fixture(scope="session")
def fixtures():
    build_fixtures()
    return FixturePrograms()


@pytest.fixture(params=OPT_LEVELS)
def opt(request):
    """Runs a test once per optimisation level the fixtures are built at."""
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


@pytest.fixture(scope="session", autouse=True)
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
