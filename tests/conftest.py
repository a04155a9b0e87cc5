import os

# Kyutai's code calls torch.compile lazily; on CPU that fails or crawls.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from lanes import IN_CI, deselect, require_reference, require_tools  # noqa: E402

SKIPPED_BY_MARKER = pytest.StashKey[bool]()


def pytest_configure(config):
    deselect(config.option.markexpr)  # before any test module is imported


def pytest_runtest_setup(item):
    """The markers' needs (tests/lanes.py): missing tools or reference stack skip the test."""
    marks = list(item.iter_markers("system"))  # the module's and the test's
    tools = [t for m in marks for t in m.args]
    if marks and not tools:
        pytest.fail('pytest.mark.system needs the tools\' names, e.g. '
                    'pytest.mark.system("espeak-ng", "sox")', pytrace=False)
    try:
        if tools:
            require_tools(*dict.fromkeys(tools))
        if item.get_closest_marker("torch") is not None:
            require_reference()
    except pytest.skip.Exception:
        item.stash[SKIPPED_BY_MARKER] = True
        raise


def _fail_skip_in_ci(report) -> None:
    """In CI nothing may skip: a skipped test (or module) fails, with the skip's reason."""
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI={os.environ['CI']}; nothing may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.stash.get(SKIPPED_BY_MARKER, False) \
            and isinstance(report.longrepr, tuple):
        # Reported at the test, not at the helper that skipped it (as pytest does for skipif).
        path, line = item.reportinfo()[:2]
        report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
    _fail_skip_in_ci(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(autouse=True)
def _cpu_and_seed():
    mx.random.seed(0)
    yield
