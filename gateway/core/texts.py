"""zh-CN / en texts of the pricing core: error reasons and receipt labels.

The verdict texts are gateway/core/reasons.py. Reason codes are stable
(POS software switches on them); the texts may change. Amounts in texts are
yuan strings already formatted by ``texts.yuan``.
"""

from __future__ import annotations

from gateway.core.reasons import yuan

PRICING_REASONS: dict[str, tuple[str, str]] = {
    "basket_invalid": ("商品明细有误：{detail}", "The basket is not valid: {detail}"),
    "tender_invalid": ("支付方式有误：{detail}", "The tender is not valid: {detail}"),
    "member_required": ("需先识别会员", "A member card is needed for this"),
    "member_limited": ("离线受限会员，不能使用储值、积分或优惠券", "Limited offline member: no stored value, points redemption or coupons"),
    "member_blocked": ("此卡有欠款未结清，仅可充值", "This card owes the store money: top-ups only until it is settled"),
    "rules_stale": ("门店规则已过期（{age_s}秒，上限{limit_s}秒），暂不能{what_zh}", "The store's rules are too old ({age_s} s, limit {limit_s} s): {what_en} refused"),
    "sync_stale": ("会员余额已{age_s}秒未与总部同步（上限{limit_s}秒），暂不能{what_zh}", "The member balances were last synced with HQ {age_s} s ago (limit {limit_s} s): {what_en} refused"),
    "redemption_disabled": ("本店不支持积分抵现", "Points redemption is not offered"),
    "points_min": ("积分抵现至少{limit}分，本次{asked}分", "At least {limit} points must be redeemed; asked {asked}"),
    "points_step": ("积分需按{limit}分的整数倍使用，本次{asked}分", "Points are redeemed in multiples of {limit}; asked {asked}"),
    "points_insufficient": ("可用积分{limit}分，不足{asked}分", "Only {limit} points available; asked {asked}"),
    "points_max_share": ("积分抵现最多{limit}分（不超过应付{percent}%），本次{asked}分", "At most {limit} points ({percent}% of the bill); asked {asked}"),
    "points_offline_tx_limit": ("离线每笔最多抵现{limit}分，本次{asked}分", "Offline limit per transaction is {limit} points; asked {asked}"),
    "points_offline_day_limit": ("离线今日还可抵现{limit}分，本次{asked}分", "Offline limit left today is {limit} points; asked {asked}"),
    "stored_value_not_allowed": ("此卡不能使用储值支付", "This card cannot pay with stored value"),
    "stored_value_insufficient": ("储值余额{limit}元，不足{asked}元", "Stored-value balance is {limit}; asked {asked}"),
    "stored_value_exceeds_due": ("储值支付{asked}元超过应付{limit}元", "Stored-value payment {asked} exceeds the amount due {limit}"),
    "stored_value_offline_tx_limit": ("离线储值每笔最多{limit}元，本次{asked}元", "Offline stored-value limit per transaction is {limit}; asked {asked}"),
    "stored_value_offline_day_limit": ("离线储值今日还可用{limit}元，本次{asked}元", "Offline stored-value limit left today is {limit}; asked {asked}"),
    "coupon_unknown": ("优惠券{code}不存在", "Coupon {code} is unknown"),
    "coupon_not_member": ("优惠券{code}不属于此会员", "Coupon {code} belongs to another member"),
    "coupon_used": ("优惠券{code}已使用", "Coupon {code} has already been used"),
    "coupon_duplicate": ("优惠券{code}重复使用", "Coupon {code} is given twice"),
    "coupon_not_yet_valid": ("优惠券{code}自{date}起可用", "Coupon {code} is valid from {date}"),
    "coupon_expired": ("优惠券{code}已于{date}过期", "Coupon {code} expired on {date}"),
    "coupon_min_spend": ("优惠券{code}需满{limit}元，当前{asked}元", "Coupon {code} needs a spend of {limit}; the basket is {asked}"),
    "return_invalid": ("退货明细有误：{detail}", "The return is not valid: {detail}"),
    "return_unknown_line": ("原单没有此商品：{detail}", "Not in the original sale: {detail}"),
    "return_qty_exceeds": ("退货数量超出可退数量{limit}（本次{asked}）", "Cannot return more than the {limit} left to return (asked {asked})"),
    "topup_invalid": ("充值有误：{detail}", "The top-up is not valid: {detail}"),
    "topup_unknown_package": ("充值套餐{code}不存在", "Top-up package {code} is unknown"),
    "package_unknown": ("此会员没有次卡{code}", "The member holds no package {code}"),
    "package_invalid_uses": ("使用次数须为1到{limit}的整数", "Uses must be a whole number from 1 to {limit}"),
    "package_insufficient": ("次卡剩余{limit}次，不足{asked}次", "Only {limit} uses left on the package; asked {asked}"),
    "package_expired": ("次卡{name_zh}已于{date}到期，续费后可继续使用", "Package {name_en} expired on {date}; renew it to use it again"),
    "package_not_sold": ("次卡{code}不在本店销售", "Package {code} is not sold at the counter"),
    "package_not_renewable": ("次卡{code}尚有{limit}次未用，用完后方可再买", "Package {code} still has {limit} use(s) left; it cannot be renewed before they are used"),
    "package_over_limit": ("次卡剩余次数不能超过{limit}次", "A package cannot hold more than {limit} uses"),
    "package_payment_invalid": ("次卡付款方式有误：{detail}", "The package payment is not valid: {detail}"),
    "package_stored_value_not_allowed": ("次卡{code}不能用储值购买", "Package {code} cannot be paid with stored value"),
    "gift_invalid": ("礼品兑换有误：{detail}", "The gift redemption is not valid: {detail}"),
    "gift_unknown": ("礼品{code}不在兑换目录中", "Gift {code} is not in the gift catalogue"),
    "gift_not_offered": ("礼品{code}兑换期为{start}至{end}", "Gift {code} can be redeemed from {start} to {end}"),
    "gift_day_limit": ("礼品{code}每人每天限兑{limit}份，今日已兑{used}份", "Gift {code}: at most {limit} per member a day; {used} redeemed today"),
    "card_op_invalid": ("卡务操作有误：{detail}", "The card operation is not valid: {detail}"),
    "withdrawal_invalid": ("取款有误：{detail}", "The withdrawal is not valid: {detail}"),
    "withdrawal_not_allowed": ("本店不办理储值取款，请联系总部", "Stored value cannot be paid out at the store; please contact HQ"),
    "withdrawal_over_limit": ("取款金额超出可取额度（最多 {max}）", "The amount is above what may be paid out here (at most {max})"),
}

# Receipt labels, (zh-CN, en).
PRICING_RECEIPT: dict[str, tuple[str, str]] = {
    "member": ("会员", "Member"),
    "tier_discount": ("{name}折扣{percent}%", "{name} discount {percent}%"),
    "allocated": ("{name}（分摊）", "{name} (share)"),
    "coupon": ("优惠券{code}", "Coupon {code}"),
    "subtotal": ("商品合计", "Subtotal"),
    "discount_total": ("优惠合计", "Discounts"),
    "total": ("应付金额", "Total"),
    "points_redeemed": ("积分抵现 {points}分", "Points redeemed {points}"),
    "stored_value_paid": ("储值支付", "Stored value paid"),
    "stored_value_left": ("储值余额", "Stored value balance"),
    "cash_due": ("现金等应付", "To pay (cash/other)"),
    "points_earned": ("本次积分", "Points earned"),
    "points_balance": ("积分余额", "Points balance"),
    "pts_base": ("基础积分（每元{ppy}分）", "Base ({ppy} per yuan)"),
    "pts_tier": ("{name} {percent}%", "{name} {percent}%"),
    "pts_category": ("类别{key} {percent}%", "Category {key} {percent}%"),
    "pts_sku": ("商品{key} {percent}%", "Item {key} {percent}%"),
    "pts_member_day": ("会员日 {percent}%", "Member day {percent}%"),
    "pts_birthday": ("生日{period_zh} {percent}%", "Birthday {period_en} {percent}%"),
    "pts_campaign": ("{name} {percent}%", "{name} {percent}%"),
    "pts_min_spend": ("未满{limit}元，不积分", "Below {limit}: no points"),
    "return": ("退货", "Return"),
    "refund_total": ("退款合计", "Refund total"),
    "refund_cash": ("退现金等", "Refund (cash/other)"),
    "refund_stored_value": ("退回储值", "Refund to stored value"),
    "refund_points": ("退回抵现积分 {points}分", "Redeemed points returned {points}"),
    "points_reversed": ("扣回积分", "Points taken back"),
    "discount_reversed": ("冲回优惠", "Discounts reversed"),
    "topup": ("储值充值", "Stored-value top-up"),
    "topup_bonus": ("赠送", "Bonus"),
    "credited": ("到账", "Credited"),
    "package_use": ("次卡{name}使用{uses}次", "{name}: {uses} use(s)"),
    "package_left": ("剩余次数", "Uses left"),
    "package_sale": ("购买次卡{name} {uses}次", "{name}: {uses} use(s) bought"),
    "package_renewal": ("续费次卡{name} {uses}次", "{name}: renewed, {uses} use(s) added"),
    "package_price": ("应付金额", "Price"),
    "package_expires": ("有效期至 {date}", "Valid until {date}"),
    "gift": ("礼品兑换 {name} x{qty}", "Gift {name} x{qty}"),
    "gift_points": ("使用积分", "Points used"),
    "fee": ("手续费", "Fee"),
    "card_issue": ("办卡", "Card issued"),
    "card_report_lost": ("挂失", "Card reported lost"),
    "card_freeze": ("冻结", "Card frozen"),
    "card_unfreeze": ("解冻", "Card unfrozen"),
    "card_replace": ("补换新卡", "Card replaced"),
    "card_annual_fee": ("年费", "Annual fee"),
    "card_extend": ("延期", "Card validity extended"),
    "card_issue_subsidiary": ("办理附属卡", "Subsidiary card issued"),
    "card_expires": ("有效期至 {date}", "Valid until {date}"),
    "card_primary": ("主卡 {card}", "Primary card {card}"),
    "withdrawal": ("储值取款（本金）", "Stored value paid out (paid part)"),
    "registration": ("会员办卡", "Member registered"),
}

LANGS = ("zh-CN", "en")


class YuanTexts(dict):
    """fen -> ``yuan(fen)``, made on first use: a rule set's receipts show the
    same amounts (prices, discounts) quote after quote. Kept by the rule
    set's compiled promotions (promotions.Catalog); bounded."""

    LIMIT = 8192

    def __missing__(self, fen: int) -> str:
        if len(self) >= self.LIMIT:
            self.clear()
        text = self[fen] = yuan(fen)
        return text


def label(key: str, lang: str, /, **kw) -> str:
    return PRICING_RECEIPT[key][0 if lang == "zh-CN" else 1].format(**kw)


def name_of(obj: dict | None, fallback: str) -> dict:
    """A rule's ``name`` ({lang: text}), or the fallback in every language."""
    return (obj or {}).get("name") or {"zh-CN": fallback, "en": fallback}


def saving_labels(title: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """The receipt row prefixes of a saving titled ``title`` ({lang: text}):
    (zh, en) of an item row "  <title>  -", and of an allocated share
    "  <title> (share)  -"."""
    return (tuple(f"  {title[lang]}  -" for lang in LANGS),
            tuple("  " + label("allocated", lang, name=title[lang]) + "  -" for lang in LANGS))
