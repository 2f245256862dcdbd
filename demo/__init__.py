"""Tooling, not product: the demo rig (``python -m demo``, ``make demo``) and
the test-bed it shares with tests/ and bench/ (brokers, a link proxy, free
ports, terminals). The product packages never import it (tests/test_layers.py).
"""
