"""Card protocols, apart from the devices that read them (``hardware/``).

- ``magstripe``: ISO/IEC 7813 track parsing of a swipe.
- ``member_qr``: the member app's dynamic QR code (signed, time-stepped).
- ``ntag424``: NTAG 424 DNA Secure Unique NFC (SUN) messages and their read
  counters.

Imports only the standard library, ``cryptography`` and ``wire/``.
"""
