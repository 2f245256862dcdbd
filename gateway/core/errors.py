"""One domain error: what a request may be refused with, in one shape.

A ``DomainError`` carries a stable ``code`` (POS software switches on it), an
HTTP ``status``, the zh-CN and en ``text`` the people at the counter see, and
the ``field`` it is about where there is one. Every refusal of the store box
is one (the POS API's door, the counter, the journal, the HTTP server's
limits, terminals, rule sets), and the HTTP layer turns any of them into the
one error body ``{"error": {"code", "message", "text": {"zh-CN", "en"},
"field"?}}`` in one place (gateway/shell/api.py ``error_answer``,
gateway/shell/http_server.py ``error_response``).

Texts: a subclass or a raise may give its own; otherwise the code's text in
``TEXTS``, else the status's in ``STATUS_TEXTS``, else "internal". Codes are
stable; texts may change.

Pure: no I/O.
"""

from __future__ import annotations

# What the POS and the people at the counter see for each error code, in both languages.
TEXTS: dict[str, tuple[str, str]] = {
    "journal_unavailable": ("交易未能保存，请勿重复收款，稍后重试或联系店长",
                            "The sale could not be saved. Do not take payment again; retry or call the manager"),
    "journal_full": ("门店存储已满，会员交易暂停，请按非会员结账并联系店长",
                     "Store storage is full: member sales are paused. Check out as a non-member and call the manager"),
    "no_member": ("本通道没有已验证的会员卡，请重新刷卡", "No member card accepted on this lane; please tap again"),
    "quote_changed": ("价格已更新，请重新计算", "Prices changed; please quote again"),
    "unauthorized": ("终端未登录或凭证无效，请联系店长", "This terminal is not signed in or its credential is not valid; "
                     "call the manager"),
    "forbidden": ("此终端无权进行该操作", "This terminal may not do this"),
    "too_many_failures": ("登录失败次数过多，请稍后再试", "Too many failed sign-ins; try again in a minute"),
    "host_not_allowed": ("请求地址不属于本门店网关", "This request was not addressed to this store's gateway"),
    "origin_not_allowed": ("不允许来自该网页的请求", "Requests from this web page are not allowed"),
    "unsupported_media_type": ("请求格式须为 JSON", "The request body must be JSON (Content-Type: application/json)"),
    "bad_request": ("请求内容有误，请检查后重试", "The request is not valid; check it and retry"),
    "not_found": ("请求的功能不存在", "No such function"),
    "unknown_lane": ("本店没有这个收银通道", "This store has no such lane"),
    "method_not_allowed": ("不支持此请求方式", "This method is not allowed here"),
    "too_large": ("请求内容过大", "The request is too large"),
    "idempotency_conflict": ("交易编号已用于另一笔交易，请重新发起", "This transaction key was used for a different "
                             "request; start the transaction again"),
    "not_a_terminal_lane": ("该通道使用本机读卡器，不接受终端刷卡", "This lane reads cards with its own reader"),
    "internal": ("系统错误，未记录任何交易，请重试或联系店长", "Internal error; nothing was recorded. Retry or call the manager"),
    # refused by the HTTP server before the request reaches the API (gateway/shell/http_server.py)
    "too_many_connections": ("网关繁忙，请稍后重试", "The gateway is busy; try again in a moment"),
    "too_many_event_streams": ("实时通知连接过多，请稍后重试",
                               "Too many live event connections; try again later"),
    "request_timeout": ("请求超时，请重试", "The request took too long to arrive; retry"),
    "headers_too_large": ("请求头过大", "The request headers are too large"),
    "length_required": ("请求须带 Content-Length", "The request body needs a Content-Length"),
    # not answered over HTTP today: named here so that every refusal has its texts
    "terminals_invalid": ("终端凭证文件或命令有误", "The terminals file or command cannot be used"),
    "rules_rejected": ("总部下发的会员规则未被采用，继续使用当前规则",
                       "The rule set from HQ was not applied; the current rules stay in force"),
}

# A code without its own text gets its status's.
STATUS_TEXTS: dict[int, tuple[str, str]] = {
    400: TEXTS["bad_request"], 401: TEXTS["unauthorized"], 403: TEXTS["forbidden"], 404: TEXTS["not_found"],
    409: ("请求与当前状态冲突，请重试", "The request conflicts with the current state; retry"),
    422: ("按门店规则不能办理此业务", "The store's rules do not allow this"), 507: TEXTS["journal_unavailable"],
}

# A request refused at the door (gateway/shell/api_schema.py RequestInvalid): its ``kind`` -> text
# naming the field; the text without a field for the body as a whole.
REQUEST_TEXTS: dict[str, tuple[str, str]] = {
    "not_json": ("请求内容不是有效的 JSON", "The request is not valid JSON"),
    "not_utf8": ("请求内容不是 UTF-8 编码", "The request is not UTF-8 text"),
    "not_object": ("请求内容必须是 JSON 对象", "The request must be a JSON object"),
    "too_large": ("请求内容过大", "The request is too large"),
    "too_deep": ("请求内容嵌套过深：{field}", "The request is nested too deeply: {field}"),
    "duplicate_key": ("字段重复：{field}", "Field given twice: {field}"),
    "unknown_field": ("不支持的字段：{field}", "Unknown field: {field}"),
    "missing_field": ("缺少必填字段：{field}", "Required field missing: {field}"),
    "out_of_range": ("数值超出允许范围：{field}", "Number out of range: {field}"),
    "bad_text": ("文字含有不允许的字符：{field}", "Text contains characters that are not allowed: {field}"),
    "too_long": ("内容过长：{field}", "Too long: {field}"),
    "too_many": ("条目过多：{field}", "Too many items: {field}"),
    "invalid": ("请求内容有误：{field}", "Invalid request: {field}"),
}
REQUEST_TEXT_NO_FIELD = ("请求内容有误", "Invalid request")


def text_of(code: str, status: int) -> dict[str, str]:
    zh, en = TEXTS.get(code) or STATUS_TEXTS.get(status) or TEXTS["internal"]
    return {"zh-CN": zh, "en": en}


class DomainError(Exception):
    """A refusal: ``code``, HTTP ``status``, ``text`` {"zh-CN", "en"}, ``field`` (or None).
    ``str()`` is the English message for logs and the POS's developers.

    Subclasses set ``code`` and ``status`` as class attributes; a raise may
    give others (``DomainError("...", code="unknown_lane", status=404)``)."""

    code: str = "bad_request"
    status: int = 400

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None,
                 text: dict[str, str] | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.field = field
        self.headers = headers
        self.text = text if text is not None else text_of(self.code, self.status)

    @property
    def zh(self) -> str:
        return self.text["zh-CN"]

    @property
    def en(self) -> str:
        return self.text["en"]

    def public(self) -> dict:
        """The ``error`` object of the answer (the API's ERROR schema), in its key order."""
        out = {"code": self.code, "message": str(self), "text": self.text}
        if self.field is not None:
            out["field"] = self.field
        return out


class NoMember(DomainError, ValueError):
    """A member sale was asked for on a lane where no member card was accepted."""

    code, status = "no_member", 409


class QuoteChanged(DomainError, ValueError):
    """The POS's expected total no longer matches the price (rules changed)."""

    code, status = "quote_changed", 409
