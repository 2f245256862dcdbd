"""Durable state of the store box: the journal (and, as the house moves in, the member and rules stores)."""
