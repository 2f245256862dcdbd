"""The gateway in-process: a simulated reader drives validation, the gpiozero
indicator (MockFactory) shows the verdict, and the lane's POS sees it."""

import asyncio

from gpiozero.pins.mock import MockFactory

from gateway.shell import config as gw_config
from gateway.shell.service import Gateway
from tests.support import GOLD_UID, install_rules


async def test_simulated_tap_to_indicator_and_lane_events(tmp_path, broker):
    factory = MockFactory()
    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", "reader": "simulated", "indicator": "gpio",
                   "gpio": {"green": 17, "red": 27, "buzzer": 22, "status": 23}}],
    })
    async with Gateway(cfg, pin_factory=factory) as gw:
        install_rules(gw)  # issued now: fresh
        events: asyncio.Queue = asyncio.Queue()
        gw.lanes["1"].listeners.add(events)
        green, red = factory.pin(17), factory.pin(27)

        gw.sim_reader("1").present(GOLD_UID, "nfc")
        tap = await asyncio.wait_for(events.get(), 5)
        assert tap["verdict"] == "accept" and tap["member"]["member_id"] == "M1001"
        await asyncio.sleep(0.1)
        assert green.state is True and red.state is False          # the accept pattern is on

        gw.sim_reader("1").present("880000000054", "qr")            # lost card
        tap = await asyncio.wait_for(events.get(), 5)
        assert tap["reason"] == "lost"
        await asyncio.sleep(0.05)
        assert red.state is True and green.state is False          # deny cut the accept short

        sale = await gw.commit_sale("1", {"idempotency_key": "pos1-inproc-1",
                                          "lines": [{"sku": "a", "qty": 1, "unit_price": 1000}]})
        assert sale.response["total"] == 1000                       # the lost card is no member
        assert (await asyncio.wait_for(events.get(), 5))["type"] == "sale"
