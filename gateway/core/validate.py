"""Card validation over plain data, and the applied rule set (``Rules``).
Pricing is gateway/core/ (``Rules`` compiles its promotions when built).

No I/O and no clock reads: time is an argument; the member snapshot is
reached only through ``rules.members``, a ``MemberLookup``
(gateway/core/members.py: get / card_for_uid / denied / local_totals, and
``live``: HQ's live answers held for a short time), an injected lookup.

Which account a verdict decides by (its member summary's ``source``):
``"live"`` when HQ answered for the card a moment ago (gateway/
shell/live_accounts.py; the answer is held in ``rules.members.live`` for
``api.member_hold_s``): HQ's live account plus this store's records
journaled after the answer's ``store_seq``; ``"snapshot"`` otherwise: HQ's
snapshot plus this store's records after the snapshot's watermark. The daily
offline allowances (``today``) always count this store's records since the
snapshot, so a live answer never hands back what the day has used.

"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from gateway.core.clock import ClockCheck, check as check_clock, untrusted_ages
from gateway.core.errors import DomainError
from gateway.core.members import InMemoryMembers, LiveAccount, MemberLookup
from gateway.core.promotions import with_catalog
from gateway.core.reasons import reason_text
from wire.ruleset import validate_ruleset, with_defaults

# Which indicator pattern each verdict shows at the counter.
PATTERN_FOR_VERDICT = {"accept": "accept", "accept_limited": "accept", "deny": "deny", "retry": "tap_again"}


@dataclass(frozen=True)
class Rules:
    """A validated effective rule set, ready to decide by.

    ``data``: the policy (wire/RULESET.md sections, defaults filled; the
    inline ``members``/``deny`` tables are taken out). ``members``: the member
    snapshot and deny list behind the ``MemberLookup`` interface (SQLite
    ``MemberStore`` or ``InMemoryMembers``)."""

    version: int
    issued_at: int
    scope: dict
    data: dict
    members: MemberLookup = field(repr=False, compare=False)
    programs: tuple = field(default=(), repr=False, compare=False)  # (prefix, length, id, program), longest prefix first

    def __post_init__(self) -> None:
        # Promotions compiled once, here, where a rule set is applied (the quotes reuse them).
        self.data["promotions"] = with_catalog(self.data)["promotions"]
        progs = sorted(((p["prefix"], p["length"], pid, p) for pid, p in self.data["card_programs"].items()),
                       key=lambda t: -len(t[0]))
        object.__setattr__(self, "programs", tuple(progs))

    @classmethod
    def from_rule_set(cls, rules: dict, *, version: int, issued_at: int, scope: dict | None = None,
                      members: MemberLookup | None = None) -> "Rules":
        """From an effective rule set (plain data; the signed path builds Rules
        in gateway/store/rules.py). Without ``members`` the rule set's inline
        ``members``/``deny`` tables become an InMemoryMembers; with a
        MemberStore (large snapshots come as parts) inline tables are ignored."""
        validate_ruleset(rules)  # raises RulesetError naming the rule and field
        data = with_defaults(rules)
        inline_members, inline_deny = data.pop("members", {}), data.pop("deny", {})
        if members is None:
            members = InMemoryMembers(inline_members, inline_deny, version=version, as_of=issued_at)
        return cls(version, issued_at, scope or {}, data, members)

    @property
    def uid_index(self) -> "_UidLookup":
        """Read-only mapping UID -> card number (``.get``), backed by the member store."""
        return _UidLookup(self.members)


class _UidLookup(dict):
    """Compatibility for callers that did ``rules.uid_index.get(uid)``."""

    def __init__(self, members) -> None:
        super().__init__()
        self._members = members

    def get(self, uid, default=None):
        return self._members.card_for_uid(uid) or default

    def __getitem__(self, uid):
        card = self._members.card_for_uid(uid)
        if card is None:
            raise KeyError(uid)
        return card

    def __contains__(self, uid) -> bool:
        return self._members.card_for_uid(uid) is not None


@dataclass(frozen=True)
class Verdict:
    verdict: str  # accept | accept_limited | deny | retry
    reason: str
    card_no: str | None = field(default=None, repr=False)  # never logged or shown in full
    member: dict | None = None
    detail: dict | None = None  # fills the reason text, e.g. {"last4": "0021"} for replaced

    @property
    def accepted(self) -> bool:
        return self.verdict in ("accept", "accept_limited")

    @property
    def pattern(self) -> str:
        return PATTERN_FOR_VERDICT[self.verdict]

    def public(self) -> dict:
        """What the POS and lane terminals receive: no full card number."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "text": reason_text(self.reason, self.detail),
            "pattern": self.pattern,
            "card": mask_card(self.card_no) if self.card_no else None,
            "member": self.member,
        }


class BasketError(DomainError, ValueError):
    """A basket the POS sent that cannot be priced; names the line and field."""

    code, status = "bad_request", 400


def mask_card(card_no: str) -> str:
    if len(card_no) <= 8:
        return "*" * (len(card_no) - 2) + card_no[-2:]
    return card_no[:4] + "*" * (len(card_no) - 8) + card_no[-4:]


def mask_name(name: str | None) -> str | None:
    """HQ sends names masked (王*); masked again here in case one slips through."""
    if not name:
        return None
    return name[0] + "*" * max(1, len(name) - 1)


def _luhn_sum(digits: str, double_odd: int) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == double_odd:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total


def luhn_ok(number: str) -> bool:
    return _luhn_sum(number, 1) % 10 == 0


def luhn_check_digit(body: str) -> str:
    """The digit that makes ``body + digit`` pass luhn_ok (card issuing, test data)."""
    return str((10 - _luhn_sum(body, 0) % 10) % 10)


_DIGITS = re.compile(r"^[0-9]+$")


def card_number_of(source: str, raw: str, rules: Rules) -> tuple[str | None, str | None]:
    """(card number, None) or (None, reason). NFC cards are looked up by UID
    in the member snapshot; magstripe and QR carry the card number itself."""
    if source == "nfc":
        card_no = rules.members.card_for_uid(raw)
        return (card_no, None) if card_no else (None, "unknown_nfc_card")
    card_no = raw.strip()
    if not _DIGITS.match(card_no):
        return None, "unknown_card_format"
    return card_no, None


def program_for(card_no: str, rules: Rules) -> tuple[str | None, dict | None, str | None]:
    """(program id, program, None) or (None, None, reason): the longest
    matching prefix of the right length wins."""
    for prefix, length, pid, prog in rules.programs:
        if len(card_no) == length and card_no.startswith(prefix):
            if prog["check_digit"] == "luhn" and not luhn_ok(card_no):
                return None, None, "bad_check_digit"
            return pid, prog, None
    return None, None, "unknown_card_format"


def _tier_summary(tier_code: str, rules: Rules) -> dict:
    tier = rules.data["tiers"][tier_code]
    return {"code": tier_code, "name": tier["name"], "rank": tier["rank"],
            "discount_percent": tier["discount_percent"],
            "points_multiplier_percent": tier["points_multiplier_percent"]}


def _default_tier(rules: Rules) -> str:
    tiers = rules.data["tiers"]
    return rules.data.get("default_tier") or min(tiers, key=lambda t: tiers[t]["rank"])


def _card_type_summary(code: str, rules: Rules) -> dict:
    ct = rules.data["card_types"][code]
    return {"code": code, "name": ct["name"], "kind": ct["kind"], "earns_points": ct["earns_points"],
            "stored_value": ct["stored_value"], "discount_percent": ct["discount_percent"]}


def _deny_verdict(status: str, card_no: str, entry: dict | None = None) -> Verdict:
    detail = None
    if status == "replaced" and entry and entry.get("replaced_by"):
        detail = {"last4": entry["replaced_by"][-4:]}
    return Verdict("deny", status, card_no, detail=detail)


def _expired(record: dict, today: date) -> bool:
    return "expires" in record and date.fromisoformat(record["expires"]) < today


NOT_OFFLINE = {"stored_value": False, "redemption": False, "coupons": False}
# Statuses HQ holds an overdrawn account's cards in (hq_bridge/reconcile.py): identified, not refused.
HELD = ("blocked", "limited")


def offline_ages(rules: Rules, now: datetime, clock: ClockCheck | None = None) -> dict[str, int]:
    """How old what the store decides by is, in seconds: the one place the
    tap (validate) and pricing (the counter passes these to pricing.quote)
    get the ages for the offline limits from, so they never disagree.

    ``rules_age_s``: since HQ issued the rule set (``max_age_s``).
    ``sync_age_s``: since HQ last sent the balances, i.e. the older of the
    rule set and the member snapshot's ``as_of`` (``max_sync_age_s``): fresh
    rules over a days-old snapshot still mean days-old balances, which other
    stores may have spent since. A snapshot without ``as_of`` (0) came with
    the rules.

    ``clock``: the gateway's verdict on its clock (gateway/core/clock.py,
    from every time it knows); without one, the rules' issue time is the
    evidence. A clock that is not sane cannot say how old the rules are:
    the ages are then past ``max_age_s`` (stale), never negative or fresh."""
    now_s = int(now.timestamp())
    as_of = rules.members.as_of or rules.issued_at
    ages = {"rules_age_s": max(0, now_s - rules.issued_at), "sync_age_s": max(0, now_s - min(rules.issued_at, as_of))}
    clock = clock if clock is not None else check_clock(now_s, {"rules": rules.issued_at})
    if clock.sane:
        return ages
    return untrusted_ages(ages, clock, issued_at=rules.issued_at, as_of=as_of, max_age_s=rules.data["max_age_s"])


def validate(source: str, raw: str, rules: Rules | None, now: datetime, *,
             clock: ClockCheck | None = None) -> Verdict:
    """Decide whether a card read identifies a member in good standing
    (wire/RULESET.md "Card status verdicts"). Pure: the member store is the
    only lookup, ``now`` (aware, store time) the only clock, ``clock`` the
    gateway's verdict on it (``offline_ages``)."""
    if rules is None:
        return Verdict("deny", "no_rules")
    card_no, reason = card_number_of(source, raw, rules)
    if card_no is None:
        return Verdict("deny", reason)
    _pid, prog, reason = program_for(card_no, rules)
    if reason:
        return Verdict("deny", reason)
    if source not in prog["sources"]:
        return Verdict("deny", "source_not_allowed", card_no)
    members = rules.members
    denied = members.denied(card_no)
    if denied and denied["status"] not in HELD:
        return _deny_verdict(denied["status"], card_no, denied)
    # 欠款冻结: HQ blocked the account for an overdraft. Identified, nothing to
    # spend (like rules_stale), so the counter can take a top-up to settle it.
    blocked = bool(denied) and denied["status"] == "blocked"
    # 欠款限用: HQ limited the account for an overdraft. Offline as blocked (but
    # its own reason); online HQ's live answer decides (it says whether the
    # account is still limited, and holds its allowances back while it is).
    limited = bool(denied) and denied["status"] == "limited"
    data = rules.data
    today = now.date()
    ages = offline_ages(rules, now, clock)
    stale = ages["rules_age_s"] > data["max_age_s"]
    limits = ["rules_stale"] if stale else []

    live = live_account(members, card_no, now)
    record = live.row if live else members.get(card_no)
    if live and record.get("primary_card") and (live.primary or {}).get("card_no") != record["primary_card"]:
        return validate_without_live(source, raw, rules, now, clock=clock)   # the account's row did not come: no mixing
    if live:
        limited = False     # HQ's answer now says whether the account is limited (a lift may be on its way)
    if record is None:
        # A valid card number HQ has not sent us yet (issued elsewhere today):
        # identify as a basic member, points accrue, HQ reconciles.
        # Blocked or limited too (a card HQ issued on a held account, told by the deny delta):
        # it holds nothing here either, and without its account no top-up; the reason names HQ's hold.
        held = "blocked" if blocked else "limited" if limited else None
        return Verdict("accept_limited", held or "member_not_in_snapshot", card_no, {
            "member_id": None, "account_id": None, "name": None,
            "tier": _tier_summary(_default_tier(rules), rules),
            "card_type": _card_type_summary(prog["card_type"], rules),
            "points": None, "balance_fen": None, "packages": {}, "coupons": [],
            "today": {"points_redeemed": 0, "stored_value_paid_fen": 0, "promotion_uses": {}, "coupons_used": []},
            "allowed": dict(NOT_OFFLINE),
            "offline_left": {"stored_value_fen": 0, "redemption_points": 0},
            "limits": [*([held] if held else []), "member_not_in_snapshot", *limits], "source": "snapshot"})
    if record["status"] == "blocked":
        blocked = True
    elif record["status"] == "limited":
        limited = True
    elif record["status"] != "active" and not (blocked or limited):   # a newer deny entry says held: it wins
        return _deny_verdict(record["status"], card_no)
    if _expired(record, today):
        return Verdict("deny", "expired", card_no)

    card_type = record.get("card_type") or prog["card_type"]
    if card_type not in data["card_types"]:
        card_type = prog["card_type"]  # a snapshot older than the rules: the program's type
    tier = record["tier"] if record["tier"] in data["tiers"] else _default_tier(rules)

    # Subsidiary (附属卡): pays from and earns to the primary's account.
    account, reason, primary_card = record, "ok", None
    if record.get("primary_card"):
        primary_card = record["primary_card"]
        primary = live.primary if live else members.get(primary_card)
        primary_denied = members.denied(primary_card)
        if (primary_denied and primary_denied["status"] in ("frozen", "cancelled")) or \
                (primary and (primary["status"] in ("frozen", "cancelled") or _expired(primary, today))):
            return Verdict("deny", "primary_inactive", card_no)
        if (primary_denied and primary_denied["status"] == "blocked") or (primary or {}).get("status") == "blocked":
            blocked = True      # the account owes: its 附属卡 too
        if (not live and primary_denied and primary_denied["status"] == "limited") or \
                (primary or {}).get("status") == "limited":
            limited = True
        if primary is None:
            reason, account = "primary_not_in_snapshot", None
            limits.append("primary_not_in_snapshot")
        else:
            account = primary
    if stale and reason == "ok":
        reason = "rules_stale"
    if blocked:
        reason = "blocked"
        limits.insert(0, "blocked")
    elif limited and live:
        limits.insert(0, "limited")     # HQ's live answer holds the allowances back: it decides
    elif limited:
        reason = "limited"
        limits.insert(0, "limited")
    summary = _summary(record, account, card_no, primary_card, tier, card_type, rules, now, ages, limits,
                       live.store_seq if live else None)
    return Verdict("accept" if reason == "ok" else "accept_limited", reason, card_no, summary)


def live_account(members: MemberLookup, card_no: str, now: datetime) -> LiveAccount | None:
    """HQ's live answer for the card held by the member store, or None: none
    held, expired, or older than the running snapshot (its watermark is below
    the snapshot's, whose deltas up to there are gone: the snapshot is the
    newer view then)."""
    if members.live is None:
        return None
    live = members.live.get(card_no, now.timestamp())
    if live is None or live.store_seq < (members.store_seq or 0):
        return None
    return live


class _NoLive:
    """A member store seen without its live answers (validate_without_live)."""

    live = None

    def __init__(self, members: MemberLookup) -> None:
        self._m = members
        self.version, self.as_of, self.store_seq = members.version, members.as_of, members.store_seq

    def get(self, card_no: str) -> dict | None:
        return self._m.get(card_no)

    def card_for_uid(self, uid: str) -> str | None:
        return self._m.card_for_uid(uid)

    def denied(self, card_no: str) -> dict | None:
        return self._m.denied(card_no)

    def local_totals(self, member_id: str, day: str, after: int | None = None) -> dict:
        return self._m.local_totals(member_id, day, after)


def validate_without_live(source: str, raw: str, rules: Rules, now: datetime, *,
                          clock: ClockCheck | None = None) -> Verdict:
    """validate() on the snapshot alone (a live answer that cannot be used whole)."""
    return validate(source, raw, replace(rules, members=_NoLive(rules.members)), now, clock=clock)


def _summary(record: dict, account: dict | None, card_no: str, primary_card: str | None, tier: str,
             card_type: str, rules: Rules, now: datetime, ages: dict, limits: list,
             live_seq: int | None = None) -> dict:
    data = rules.data
    ct = data["card_types"][card_type]
    out = {
        "member_id": record["member_id"],
        "account_id": account["member_id"] if account else None,  # whose points and balance (deltas key)
        "name": mask_name(record.get("name")),
        "tier": _tier_summary(tier, rules),
        "card_type": _card_type_summary(card_type, rules),
        "primary_card": mask_card(primary_card) if primary_card else None,
        "group_id": record.get("group_id"),
        "expires": record.get("expires"),
        "birthday": record.get("birthday"),            # MM-DD, for the birthday earning bonus
        "birthday_calendar": record.get("birthday_calendar", "solar"),
        "points": None, "balance_fen": None, "packages": {}, "package_expires": {}, "packages_expired": {},
        "coupons": [],
        "today": {"points_redeemed": 0, "stored_value_paid_fen": 0, "promotion_uses": {}, "coupons_used": []},
        "allowed": dict(NOT_OFFLINE),
        "offline_left": {"stored_value_fen": 0, "redemption_points": 0},
        "limits": limits,
        "source": "snapshot" if live_seq is None else "live",
    }
    if account is None:
        return out
    day = now.date().isoformat()
    # HQ's account (live answer or snapshot row) + what this store journaled
    # after the watermark HQ's numbers include: balances and the day's use alike.
    if live_seq is not None:
        totals = rules.members.local_totals(account["member_id"], day, after=live_seq)
    else:
        totals = rules.members.local_totals(account["member_id"], day)
    hq_today = account.get("today") or {}
    if hq_today.get("day") == day:  # every store's use today, as far as HQ has it
        totals["today"]["stored_value_paid_fen"] += hq_today.get("stored_value_paid_fen", 0)
        totals["today"]["points_redeemed"] += hq_today.get("points_redeemed", 0)
        for gid, n in (hq_today.get("gifts") or {}).items():   # a live answer's only (gifts.py day limits)
            gifts = totals["today"].setdefault("gifts", {})
            gifts[gid] = gifts.get(gid, 0) + n
    points = max(0, account["points"] + totals["points"])
    balance = max(0, account["balance_fen"] + totals["stored_value_fen"])
    out["points"], out["balance_fen"] = points, balance
    owed = -min(0, account["balance_fen"] + totals["stored_value_fen"])
    if owed:   # an overdraft HQ carries: what a top-up must bring before there is anything to spend
        out["owed_fen"] = owed
    held = account.get("packages", {})
    uses = {pkg: max(0, held.get(pkg, 0) + totals["packages"].get(pkg, 0))   # sold here since: too
            for pkg in [*held, *(k for k in totals["packages"] if k not in held)]
            if pkg in data["packages"]}
    # A package's expiry: HQ's, or the latest sale's here since (None: no expiry). Valid through
    # that day; after it the uses stay the account's but are not usable: listed apart.
    until = {**(account.get("package_expires") or {}), **totals["package_expires"]}
    until = {pkg: d for pkg, d in until.items() if d and pkg in uses}
    out["packages"] = {pkg: n for pkg, n in uses.items() if not _past(until.get(pkg), day)}
    out["package_expires"] = {pkg: d for pkg, d in until.items() if pkg in out["packages"]}
    out["packages_expired"] = {pkg: {"uses": n, "expires": until[pkg]} for pkg, n in uses.items()
                               if pkg not in out["packages"]}
    coupons = data["coupons"]
    out["coupons"] = [c for c in record.get("coupons", []) if c in coupons
                      and coupons[c]["member_id"] == record["member_id"] and c not in totals["coupons_used"]]
    out["today"] = totals["today"]
    if "rules_stale" in limits or "blocked" in limits or ("limited" in limits and live_seq is None):
        return out  # identify and accrue only

    sv = data["stored_value"]
    if ct["stored_value"] and sv["offline_max_per_tx_fen"] > 0:
        if ages["sync_age_s"] > sv["max_sync_age_s"]:
            limits.append("sync_stale")
        else:
            out["allowed"]["stored_value"] = True
            left_today = sv["offline_max_per_day_fen"] - totals["today"]["stored_value_paid_fen"]
            out["offline_left"]["stored_value_fen"] = max(0, min(sv["offline_max_per_tx_fen"], left_today, balance))
    red = data["redemption"]
    if red["offline_max_points_per_tx"] > 0:
        out["allowed"]["redemption"] = True
        left = min(red["offline_max_points_per_tx"],
                   red["offline_max_points_per_day"] - totals["today"]["points_redeemed"], points)
        left = left - left % red["step_points"] if left > 0 else 0
        out["offline_left"]["redemption_points"] = left if points >= red["min_points"] else 0
    out["allowed"]["coupons"] = True
    return out


def _past(day: str | None, today: str) -> bool:
    """A last day of use (YYYY-MM-DD, None: none) before ``today``."""
    return day is not None and day < today


def member_context(verdict: Verdict | None) -> dict | None:
    """The ``member`` argument of gateway/core/pricing.py from an accepted verdict
    (the full card number is in the verdict, never in the public summary)."""
    if verdict is None or not verdict.accepted or verdict.member is None:
        return None
    m = verdict.member
    limited = verdict.verdict == "accept_limited"
    return {
        "member_id": m["member_id"], "account_id": m.get("account_id"), "card_no": verdict.card_no,
        "tier": m["tier"]["code"], "card_type": m["card_type"]["code"],
        "birthday": m.get("birthday"), "birthday_calendar": m.get("birthday_calendar", "solar"),
        "points_available": m.get("points") or 0, "balance_available_fen": m.get("balance_fen") or 0,
        # every package held, with its expiry (expired ones too: pricing refuses their use by name,
        # and a renewal counts from the expiry and adds to the uses left)
        "packages": {**(m.get("packages") or {}),
                     **{pkg: e["uses"] for pkg, e in (m.get("packages_expired") or {}).items()}},
        "package_expires": {**(m.get("package_expires") or {}),
                            **{pkg: e["expires"] for pkg, e in (m.get("packages_expired") or {}).items()}},
        "coupons": list(m.get("coupons") or []),
        "today": dict(m.get("today") or {}),
        "limited": limited,
        # HQ's block (欠款冻结): nothing to spend (no package uses either); a top-up settles it.
        "blocked": "blocked" in (m.get("limits") or ()),
        # HQ's limit (欠款限用), offline: the same, by its own name; online the live answer decided.
        "hq_limited": verdict.reason == "limited",
    }
