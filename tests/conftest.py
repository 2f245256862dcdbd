import pytest

from demo.testbed import MosquittoBroker


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="run the long fault-injection runs")


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
