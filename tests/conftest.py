import pytest

from demo.testbed import MosquittoBroker


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="run the long fault-injection runs")


def pytest_configure(config):
    tune_gc_once_per_runner()


def tune_gc_once_per_runner() -> None:
    """common.runtime.tune_gc unfreezes, collects and freezes the whole
    process's heap; a gateway calls it at start and after every rule-set
    switch. In the test runner, hundreds of in-process gateways share one
    process whose heap is the runner's (every test module, Hypothesis,
    schemathesis): each call walked all of it again, ~0.1 s, ~300 calls a run
    (~30 s). So the runner calls the real one once (its heap is frozen then)
    and later calls only collect what came after: the garbage of earlier tests
    is still collected, and its finalizers run, at each gateway start as
    before. Gateways and HQ bridges started as processes call the real one."""
    import gc

    from common import runtime

    real = runtime.tune_gc
    tuned = False

    def tune_gc_in_the_runner() -> None:
        nonlocal tuned
        if tuned:
            gc.collect()
        else:
            real()
            tuned = True

    runtime.tune_gc = tune_gc_in_the_runner


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: use --long (make test-long)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker(tmp_path):
    b = MosquittoBroker(tmp_path / "broker_data")
    (tmp_path / "broker_data").mkdir(exist_ok=True)
    b.start()
    yield b
    b.stop()
