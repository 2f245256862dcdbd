"""Device drivers behind small interfaces, each with a simulated twin.

- readers: card readers (NFC over PC/SC, magstripe and QR over evdev, lane
  terminals over the LAN, and the simulated reader used by the demo and tests)
- indicators: counter feedback (LEDs and buzzer through gpiozero, simulated twin)
"""
