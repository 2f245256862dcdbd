"""Pieces both services share: config files and the MQTT connection."""
