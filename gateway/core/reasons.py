"""Every text a cashier or member sees, in zh-CN and en, keyed by reason code.

Codes are stable (POS software switches on them); texts may change.
"""

REASONS: dict[str, tuple[str, str]] = {
    # verdict reasons
    "ok": ("会员卡有效", "Member card accepted"),
    "member_not_in_snapshot": ("会员卡有效（离线，按普通会员处理）", "Card accepted offline as a basic member (not in the store's member list yet)"),
    "no_rules": ("门店尚未收到会员规则，暂不能识别会员", "The store has no member rules from HQ yet; members cannot be identified"),
    "unknown_card_format": ("无法识别的卡号，请确认是本店会员卡", "Card number not recognised; is this one of our member cards?"),
    "bad_check_digit": ("卡号校验失败，请重新刷卡", "Card number check digit is wrong; please present the card again"),
    "unknown_nfc_card": ("未登记的会员卡，请到服务台办理", "This NFC card is not registered; please see the service desk"),
    "lost": ("此卡已挂失，请到服务台办理", "This card has been reported lost; please see the service desk"),
    "frozen": ("此卡已冻结，请到服务台办理", "This card is frozen; please see the service desk"),
    # HQ blocked the account for an overdraft (欠款冻结): accept_limited, nothing to spend, top-ups to settle
    "blocked": ("此卡有欠款未结清，仅可充值，请到服务台办理",
                "This card owes the store money: top-ups only until it is settled; see the service desk"),
    # HQ limited the account for an overdraft (欠款限用): accept_limited offline, nothing to spend, top-ups
    # taken; online HQ's live answer decides
    "limited": ("此卡有欠款未结清，离线时暂停储值、积分抵现、优惠券和计次，请联网后使用或到服务台办理",
                "This card is limited by HQ for a debt: no stored value, points, coupons or package uses "
                "offline; online HQ decides; see the service desk"),
    "cancelled": ("此卡已注销", "This card has been cancelled"),
    "replaced": ("此卡已换新卡，请使用新卡", "This card was replaced; please use the new card"),
    "expired": ("会员卡已过期，请续期", "This membership card has expired; please renew"),
    "not_activated": ("此卡尚未激活，请到服务台激活", "This card is not activated yet; please activate it at the service desk"),
    "tap_again": ("读卡失败，请重新刷卡", "Card could not be read; please present it again"),
    "rules_stale": ("会员卡有效（会员规则已过期，仅识别会员和积分，暂停储值、积分抵现和优惠券）",
                    "Card accepted; the store's member rules are out of date: identification and points only "
                    "(no stored value, redemption or coupons)"),
    # a limit in the member summary's ``limits`` (the verdict stays "ok"): balances too old for stored value
    "sync_stale": ("会员卡有效（会员余额久未与总部同步，暂停储值支付）",
                   "Card accepted; the member balances have not been synced with HQ recently: no stored-value payment"),
    "source_not_allowed": ("此类会员卡不能以这种方式使用，请换用实体卡或会员码",
                           "This card cannot be presented this way; please use the card or the member code"),
    "primary_inactive": ("主卡已冻结或注销，附属卡不能使用，请到服务台办理",
                         "The primary card of this linked card is frozen or cancelled; please see the service desk"),
    "primary_not_in_snapshot": ("会员卡有效（离线，主卡信息暂缺，暂停储值和积分抵现）",
                                "Card accepted offline; the primary card is not in the store's member list yet "
                                "(no stored value or redemption)"),
    # -- secure NFC cards (NTAG 424 DNA SUN messages; gateway/shell/secure_nfc.py) --
    "sun_missing": ("此卡须为安全芯片卡，未读到防伪信息，请到服务台办理",
                    "This card must carry a secure NFC message and none was read; please see the service desk"),
    "sun_bad_format": ("卡片防伪信息格式错误，请到服务台办理",
                       "The card's secure NFC message is malformed; please see the service desk"),
    "sun_bad_mac": ("卡片防伪校验失败，疑似复制卡，请到服务台办理",
                    "The card's secure NFC message failed verification (possible copy); please see the service desk"),
    "sun_replayed": ("卡片防伪信息已使用过，疑似复制卡，请到服务台办理",
                     "The card's secure NFC message was already used (possible copy); please see the service desk"),
    "sun_uid_mismatch": ("卡片防伪信息与卡号不符，疑似复制卡，请到服务台办理",
                         "The card's secure NFC message belongs to another card; please see the service desk"),
    "sun_key_mismatch": ("此卡不属于该会员卡类型，请到服务台办理",
                         "This card was not issued under its card programme's keys; please see the service desk"),
    "sun_no_keys": ("门店缺少此类会员卡的校验密钥，请联系总部",
                    "The store has no keys to verify this kind of card; please contact HQ"),
}

RECEIPT: dict[str, tuple[str, str]] = {
    "tier_discount": ("{tier}折扣", "{tier} discount"),
    "subtotal": ("商品合计", "Subtotal"),
    "discount_total": ("优惠合计", "Discounts"),
    "total": ("应付金额", "Total"),
    "points_earned": ("本次积分", "Points earned"),
    "member": ("会员", "Member"),
}


# Texts that name a detail (a verdict's ``detail``); without it the plain text above is used.
REASON_DETAILS: dict[str, tuple[str, str]] = {
    "replaced": ("此卡已换新卡（新卡尾号{last4}），请使用新卡", "This card was replaced by the card ending {last4}; please use the new card"),
}


def reason_text(code: str, detail: dict | None = None) -> dict[str, str]:
    zh, en = REASON_DETAILS[code] if detail and code in REASON_DETAILS else REASONS[code]
    if detail and code in REASON_DETAILS:
        zh, en = zh.format(**detail), en.format(**detail)
    return {"zh-CN": zh, "en": en}


def yuan(fen: int) -> str:
    """Format integer fen as yuan for receipts: 1234 -> '12.34', -50 -> '-0.50'."""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


# -- magstripe swipes and member QR codes (hardware/hid.py, gateway/store/qr_replay.py) --
REASONS.update({
    "swipe_again": ("刷卡失败，请重新刷卡", "The card could not be read; please swipe it again"),
    "scan_again": ("扫码失败，请重新扫码", "The code could not be read; please scan it again"),
    "qr_bad_format": ("无法识别的会员码，请在会员App中刷新后重试",
                      "Member code not recognised; please refresh it in the member app and try again"),
    "qr_unknown_issuer": ("会员码签发方未知，请更新会员App或到服务台办理",
                          "This member code was not issued by us (unknown key); please update the app or see the service desk"),
    "qr_bad_signature": ("会员码校验失败，请在会员App中刷新后重试",
                         "The member code failed verification; please refresh it in the member app"),
    "qr_credential_expired": ("会员码已失效，请重新登录会员App",
                              "The member app's sign-in has expired; please sign in to the app again"),
    "qr_step_out_of_window": ("会员码已过期，请刷新后重试（请检查手机时间）",
                              "The member code has expired; please refresh it (and check the phone's clock)"),
    "qr_used": ("会员码已使用过，请刷新后重试", "This member code was already used; please refresh it and try again"),
    "qr_not_configured": ("本店暂不支持动态会员码，请使用会员卡",
                          "This store cannot check app member codes yet; please use the member card"),
    "qr_static_refused": ("请出示会员App中的动态会员码", "Please show the dynamic member code from the member app"),
    "qr_clock_untrusted": ("门店系统时间异常，暂不能使用动态会员码，请使用会员卡或卡号",
                           "The store system's clock is not set; app member codes cannot be checked now, "
                           "please use the member card or card number"),
})
