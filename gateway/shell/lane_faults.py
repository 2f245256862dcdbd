"""The "fault" pattern on each lane's status LED, set and cleared from what
the gateway knows: the lane's reader state and the journal's faults.

Readers change state in their own threads (PC/SC) and the journal records
faults as it finds them; a short poll catches both without callbacks into
every driver, and shows a change within `interval` seconds. Reader state
reaches HQ on the status topic (Gateway.status_message, `readers`).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("storegate.gateway")

READER_FAULT_STATES = ("absent", "fault")


def lane_fault(gateway, lane) -> str | None:
    """Why this lane shows "fault", or None."""
    if lane.reader is not None and lane.reader.state in READER_FAULT_STATES:
        return f"reader {lane.reader.state}"
    for hid in getattr(lane, "inputs", ()):  # keyboard-wedge readers of the lane
        if hid.state in READER_FAULT_STATES:
            return f"input {hid.state}"
    if gateway.journal.faults:
        return "journal fault"
    return None


def update(gateway) -> None:
    for lane in gateway.lanes.values():
        why = lane_fault(gateway, lane)
        ind = lane.indicator
        try:
            if why and not ind.fault:
                log.warning("lane %s: fault (%s)", lane.id, why)
                ind.show("fault")
            elif not why and ind.fault:
                log.info("lane %s: fault cleared", lane.id)
                ind.clear_fault()
        except RuntimeError:  # indicator closed during shutdown
            pass


async def watch(gateway, interval: float = 0.5) -> None:
    while True:
        update(gateway)
        await asyncio.sleep(interval)
