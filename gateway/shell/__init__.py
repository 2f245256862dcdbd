"""The shell of the store box: I/O and orchestration around the pure core and the durable store.

The gateway service and its counter operations, the POS API (HTTP server,
request schema, error responses), the uplink to HQ over MQTT (journal
batches, acks, rule sync, live account look-ups), configuration, terminals,
device discovery and the CLI ``storegate``. It may import everything below it
(``gateway.core``, ``gateway.store``, ``cards``, ``hardware``, ``wire``,
``common``); nothing below imports it.
"""
