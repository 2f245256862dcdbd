"""common/eventloop.py: the gateway and bridge processes run on uvloop where it
is installed (it is, in the test venv on x86-64 and aarch64), asyncio otherwise."""

import asyncio
import importlib.util

import pytest

from common import eventloop


async def _loop_kind() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop has no wheel for this platform")
def test_runs_on_uvloop_when_installed(monkeypatch):
    monkeypatch.delenv("STOREGATE_EVENT_LOOP", raising=False)
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(_loop_kind()) == "uvloop"


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_the_environment_can_choose_asyncio(monkeypatch, value):
    monkeypatch.setenv("STOREGATE_EVENT_LOOP", value)
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(_loop_kind()) == "asyncio"


def test_result_and_exceptions_come_through(monkeypatch):
    monkeypatch.delenv("STOREGATE_EVENT_LOOP", raising=False)

    async def fails():
        await asyncio.sleep(0)
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        eventloop.run(fails())
