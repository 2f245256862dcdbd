"""Member QR codes at the gateway: what it does with a scanner read before
validate.validate.

MemberQrCheck: a dynamic code ("SGQ1." prefix) is verified with the issuer
keys from the rules' `member_qr` section (cards.member_qr), then claimed in
the ReplayStore (gateway/store/qr_replay.py), and its card number goes on to
validate.validate. A static code (a plain card number) goes on unchanged when
`member_qr.static_codes` is true (the default, also when the rules have no
member_qr section).

Verdict reason codes (texts in gateway/core/reasons.py): qr_bad_format,
qr_unknown_issuer, qr_bad_signature, qr_credential_expired,
qr_step_out_of_window, qr_used, qr_not_configured, qr_static_refused,
qr_clock_untrusted (the gateway's clock is not trusted, gateway/core/clock.py:
a code's freshness cannot be judged, so dynamic codes wait for the time).
"""

from __future__ import annotations

import logging

from cards import member_qr
from gateway.store.qr_replay import ReplayStore

log = logging.getLogger("storegate.qr")

_DEFAULT_POLICY = {"issuer_public_keys": {}, "step_s": 30, "window_steps": 1, "static_codes": True}


def policy_of(rules) -> dict:
    """The rules' member_qr section with defaults (read defensively: older
    rule-set schemas have no such section)."""
    section = (rules.data.get("member_qr") if rules is not None else None) or {}
    return {**_DEFAULT_POLICY, **section}


class MemberQrCheck:
    def __init__(self, store: ReplayStore) -> None:
        self.store = store

    def identify(self, payload: str, rules, now: float, *, clock_ok: bool = True) -> tuple[str | None, str | None]:
        """(card number for validate.validate, None) or (None, verdict reason)."""
        if rules is None:
            return payload, None  # validate.validate refuses it: no rules yet
        policy = policy_of(rules)
        if not member_qr.is_dynamic(payload):
            return (payload, None) if policy["static_codes"] else (None, "qr_static_refused")
        keys = policy["issuer_public_keys"]
        if not keys:
            return None, "qr_not_configured"
        if not clock_ok:
            return None, "qr_clock_untrusted"
        step_s, window = policy["step_s"], policy["window_steps"]
        try:
            who = member_qr.verify(payload, keys, now, step_s, window)
        except member_qr.QrError as refused:
            log.info("member QR code refused: %s", refused)  # the reason, never the code
            return None, f"qr_{refused.reason}"
        # The step verifies until `window` steps after it have passed.
        if not self.store.claim(who.member_id, who.step, (who.step + window + 1) * step_s, now):
            log.warning("member QR code for member %s step %d used again (screenshot or replay)",
                        who.member_id, who.step)
            return None, "qr_used"
        return who.card_no, None

    def close(self) -> None:
        self.store.close()
