"""storegate HQ bridge: ingest store transactions into HQ's ledger exactly once, ack, publish rules."""
