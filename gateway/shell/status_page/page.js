// storegate status page: reads /status/page.json with the manager's token and
// shows it in zh-CN or en. No libraries; every text from the gateway goes in
// with textContent (never as HTML); the chart is SVG drawn here.
"use strict";

(function () {
  const TOKEN_KEY = "storegate.token";
  const LANG_KEY = "storegate.lang";
  const REFRESH_MS = 10000;
  const SVG = "http://www.w3.org/2000/svg";

  const TEXT = {
    "zh-CN": {
      title: "门店网关状态", other_lang: "English", sign_out: "退出",
      login_title: "需要店长令牌", login_help: "请输入店长终端令牌（storegate terminals add … --role manager）。令牌只保存在本浏览器中。",
      login_button: "登录", token_refused: "令牌无效或已被吊销。", too_many: "失败次数过多，请一分钟后再试。",
      unreachable: "无法连接网关：", updated: "更新于 ",
      uplink: "总部连接", online: "在线", offline: "离线", last_contact: "最近联系总部", reconnects: "断线次数", acked: "总部已确认",
      backlog: "待上传积压", records: "条记录", oldest: "最早一条已等待", last_seq: "最新序号",
      chart_caption: "积压记录数，最近 6 小时（每分钟一个样本）", chart_empty: "暂无样本",
      rules: "规则与黑名单", rules_version: "规则版本", rules_age: "规则已签发", deny_version: "黑名单版本", deny_age: "黑名单更新",
      no_rules: "无规则", stale: "（已过期）", rules_rejected: "最近被拒绝的规则：",
      clock: "时钟", gateway_time: "网关时间", browser_diff: "与本机时间相差", running_since: "运行自",
      clock_ok: "时钟正常", clock_untrusted: "网关的时钟检查未通过：比已知时间早 {n}（见下方故障）。",
      synced_yes: "已同步", synced_unknown: "未知", time_sync: "时间同步", clock_behind_rules: "网关时钟早于总部签发规则的时间 {n}，时钟可能有误。",
      clock_browser: "网关时钟与本机相差 {n}，请检查时间同步。",
      hq_diff: "与总部时间相差", hq_unknown: "未知（尚无总部确认）", hq_behind: "（网关慢）", hq_ahead: "（网关快）",
      clock_ahead: "网关时钟比总部时间快 {n}：记录的时间将是未来时间（见下方故障）。",
      storage: "日志与磁盘", journal_size: "日志占用", disk_free: "磁盘可用", records_since_start: "本次启动后记录",
      readers: "读卡器", lane: "收银通道", input: "输入", kind: "类型", state: "状态",
      taps: "本次启动后刷卡 {taps} 次（通过 {accepted}，拒绝 {denied}，需重刷 {retries}）；销售 {sales} 笔",
      faults: "当前故障", no_faults: "无故障", cleared_faults: "最近已恢复", none: "无", since: "自 ", cleared: "恢复于 ",
      never: "从未", ago: "前", of: " / ",
      state_ready: "就绪", state_absent: "未连接", state_fault: "故障", state_closed: "已关闭", state_terminal: "车道终端",
      kind_simulated: "模拟读卡器", kind_pcsc: "NFC 读卡器", kind_terminal: "车道终端", kind_magstripe: "磁条读卡器",
      kind_scanner: "扫码枪", input_reader: "读卡器",
      s: "秒", min: "分钟", h: "小时", d: "天", version: "版本 "
    },
    "en": {
      title: "Store gateway status", other_lang: "中文", sign_out: "Sign out",
      login_title: "Manager token needed", login_help: "Enter a manager terminal token (storegate terminals add … --role manager). It is kept in this browser only.",
      login_button: "Sign in", token_refused: "The token is wrong or revoked.", too_many: "Too many failures; try again in a minute.",
      unreachable: "Cannot reach the gateway: ", updated: "updated ",
      uplink: "Link to HQ", online: "online", offline: "offline", last_contact: "Last contact with HQ", reconnects: "Disconnections", acked: "Acked by HQ",
      backlog: "Backlog to HQ", records: "record(s)", oldest: "Oldest waiting", last_seq: "Last seq",
      chart_caption: "Backlog records over the last 6 hours (one sample a minute)", chart_empty: "no samples yet",
      rules: "Rules and deny list", rules_version: "Rules version", rules_age: "Rules issued", deny_version: "Deny list version", deny_age: "Deny list updated",
      no_rules: "no rules", stale: " (stale)", rules_rejected: "Last rules refused: ",
      clock: "Clock", gateway_time: "Gateway time", browser_diff: "Difference from this computer", running_since: "Running since",
      clock_ok: "Clock looks right", clock_untrusted: "The gateway's clock check fails: {n} before a time known to have passed (see the faults).",
      synced_yes: "synchronized", synced_unknown: "unknown", time_sync: "Time sync", clock_behind_rules: "The gateway's clock is {n} before HQ issued the rules: the clock is probably wrong.",
      clock_browser: "The gateway's clock differs from this computer's by {n}: check time sync.",
      hq_diff: "Difference from HQ", hq_unknown: "unknown (no acknowledgement from HQ yet)", hq_behind: " (gateway behind)", hq_ahead: " (gateway ahead)",
      clock_ahead: "The gateway's clock is {n} ahead of HQ's: records are stamped in the future (see the faults).",
      storage: "Journal and disk", journal_size: "Journal size", disk_free: "Disk free", records_since_start: "Records since start",
      readers: "Readers", lane: "Lane", input: "Input", kind: "Kind", state: "State",
      taps: "Taps since start: {taps} ({accepted} accepted, {denied} denied, {retries} to tap again); sales: {sales}",
      faults: "Faults now", no_faults: "no faults", cleared_faults: "Recently cleared", none: "none", since: "since ", cleared: "cleared ",
      never: "never", ago: " ago", of: " of ",
      state_ready: "ready", state_absent: "absent", state_fault: "fault", state_closed: "closed", state_terminal: "lane terminal",
      kind_simulated: "simulated reader", kind_pcsc: "NFC reader", kind_terminal: "lane terminal", kind_magstripe: "magstripe reader",
      kind_scanner: "scanner", input_reader: "reader",
      s: "s", min: "min", h: "h", d: "d", version: "version "
    }
  };

  let lang = localStorage.getItem(LANG_KEY) || document.documentElement.lang;
  if (!TEXT[lang]) lang = "zh-CN";
  let last = null;
  let timer = null;

  const $ = (id) => document.getElementById(id);
  const t = (key) => TEXT[lang][key] || key;
  const fill = (template, values) => template.replace(/\{(\w+)\}/g, (_, k) => String(values[k] ?? 0));
  const set = (id, text, cls) => {
    const el = $(id);
    el.textContent = text;
    if (cls !== undefined) el.className = cls;
    return el;
  };

  function duration(seconds) {
    const s = Math.abs(seconds);
    if (s < 90) return Math.round(s) + " " + t("s");
    if (s < 5400) return Math.round(s / 60) + " " + t("min");
    if (s < 172800) return (s / 3600).toFixed(1) + " " + t("h");
    return (s / 86400).toFixed(1) + " " + t("d");
  }
  const ago = (ts, now) => ts == null ? t("never") : duration(now - ts) + t("ago");
  const when = (ts) => new Date(ts * 1000).toLocaleString(lang === "en" ? "en-GB" : "zh-CN");
  function bytes(n) {
    if (n == null) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  function applyLanguage() {
    document.documentElement.lang = lang;
    for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
    $("lang-toggle").textContent = t("other_lang");
    document.title = t("title");
    if (last) render(last);
  }

  // -- the chart: backlog records per sample, the last 6 hours, as SVG ------------------
  function chart(history, now, current) {
    const box = $("chart");
    box.replaceChildren();
    const W = 600, H = 140, L = 44, R = 8, T = 8, B = 22;
    const span = history.every_s * history.max_samples;
    const points = history.samples.map((s) => [s[0], s[1]]).filter((p) => p[0] >= now - span);
    points.push([now, current]);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", t("chart_caption"));
    const el = (name, attrs, text) => {
      const e = document.createElementNS(SVG, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    const max = Math.max(1, ...points.map((p) => p[1]));
    const magnitude = Math.pow(10, Math.floor(Math.log10(max)));
    const top = [1, 2, 5, 10].map((f) => f * magnitude).find((v) => v >= max);   // a round top for the y axis
    const x = (ts) => L + (W - L - R) * (1 - (now - ts) / span);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    for (const frac of [0, 0.5, 1]) {
      const value = top * frac;
      el("line", { x1: L, x2: W - R, y1: y(value), y2: y(value), class: frac ? "grid-line" : "axis" });
      if (Number.isInteger(value)) el("text", { x: L - 4, y: y(value) + 4, "text-anchor": "end" }, String(value));
    }
    for (let hours = 6; hours >= 0; hours -= 2) {
      const ts = now - hours * 3600;
      el("line", { x1: x(ts), x2: x(ts), y1: H - B, y2: H - B + 4, class: "axis" });
      el("text", { x: x(ts), y: H - 6, "text-anchor": hours === 0 ? "end" : "middle" },
        hours ? `-${hours}${t("h")}` : (lang === "en" ? "now" : "现在"));
    }
    const path = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    if (points.length > 1) {
      el("polygon", { points: `${x(points[0][0]).toFixed(1)},${y(0)} ${path} ${x(now).toFixed(1)},${y(0)}`, class: "area" });
    }
    el("polyline", { points: path, class: "line", id: "chart-line" });
    el("circle", { cx: x(now), cy: y(current), r: 3, fill: "#1f6feb" });
    box.appendChild(svg);
  }

  // -- the page -------------------------------------------------------------------------
  function render(d) {
    const now = d.now;
    set("store", d.store);
    set("updated", t("updated") + when(now));
    set("version", "storegate " + t("version") + d.version);

    const up = d.uplink;
    set("uplink-state", up.connected ? t("online") : t("offline"), "big " + (up.connected ? "ok" : "bad"));
    set("uplink-contact", ago(up.last_hq_contact, now));
    set("uplink-reconnects", String(up.reconnects));
    set("uplink-acked", String(up.acked_records));

    const b = d.backlog;
    const age = b.oldest_age_s;
    set("backlog-records", String(b.records), age != null && age > 3600 ? "warn" : "");
    set("backlog-age", age == null ? t("none") : duration(age), age != null && age > 3600 ? "warn" : "");
    set("backlog-seq", String(b.last_seq));
    chart(d.history, now, b.records);

    if (d.rules) {
      const stale = d.rules.max_age_s != null && d.rules.age_s > d.rules.max_age_s;
      set("rules-version", "v" + d.rules.version);
      set("rules-age", duration(d.rules.age_s) + t("ago") + (stale ? t("stale") : ""), stale ? "bad" : "");
    } else {
      set("rules-version", t("no_rules"), "bad");
      set("rules-age", "–");
    }
    set("deny-version", d.deny.version == null ? t("none") : "v" + d.deny.version);
    set("deny-age", d.deny.issued_at == null ? "–" : duration(now - d.deny.issued_at) + t("ago"));
    const rejection = $("rules-rejection");
    rejection.hidden = !d.rules_rejection;
    rejection.textContent = d.rules_rejection ? t("rules_rejected") + d.rules_rejection : "";

    // The clock: the gateway's own view, and this computer's clock as a second opinion.
    const diff = now - Date.now() / 1000 + (performance.now() - fetchedAt) / 1000;
    set("clock-gateway", when(now));
    set("clock-diff", Math.abs(diff) < 1 ? duration(0) : (diff > 0 ? "+" : "−") + duration(diff),
      Math.abs(diff) > 120 ? "bad" : "");
    set("clock-started", when(d.clock.started_at));
    const problems = [];
    const check = d.clock.check;
    if (check && check.sane === false) problems.push(fill(t("clock_untrusted"), { n: duration((check.known || 0) - check.now) }));
    set("clock-sync", check ? t(check.synchronized ? "synced_yes" : "synced_unknown") : "–");
    // HQ's time in its last acknowledgement minus the gateway's clock when it came (positive: the gateway is behind).
    const hq = check ? check.offset_ms : null;
    set("clock-hq", hq == null ? t("hq_unknown") : Math.abs(hq) < 1000 ? duration(0)
      : duration(Math.abs(hq) / 1000) + t(hq > 0 ? "hq_behind" : "hq_ahead"), hq != null && Math.abs(hq) > 300000 ? "bad" : "");
    if (check && check.sane !== false && check.ahead_s) problems.push(fill(t("clock_ahead"), { n: duration(check.ahead_s) }));
    if (d.clock.behind_rules_s != null) problems.push(fill(t("clock_behind_rules"), { n: duration(d.clock.behind_rules_s) }));
    if (Math.abs(diff) > 120) problems.push(fill(t("clock_browser"), { n: duration(diff) }));
    set("clock-verdict", problems.length ? problems.join(" ") : t("clock_ok"), problems.length ? "bad" : "ok");

    const j = d.journal;
    set("journal-size", bytes(j.bytes) + t("of") + bytes(j.max_bytes));
    set("journal-records", String(j.records));
    if (d.disk) {
      const free = d.disk.free_bytes / d.disk.total_bytes;
      set("disk-free", bytes(d.disk.free_bytes) + t("of") + bytes(d.disk.total_bytes), free < 0.1 ? "bad" : "");
      $("disk-meter").style.width = Math.round((1 - free) * 100) + "%";
      $("disk-meter").style.background = free < 0.1 ? "var(--bad)" : "var(--ok)";
    } else {
      set("disk-free", "–");
    }

    const rows = d.readers.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.lane = r.lane;
      tr.dataset.state = r.state;
      // "reader": the lane's own reader; "<kind><n>": its n-th keyboard-wedge input (hardware/hid.py).
      const input = r.input === "reader" ? t("input_reader") : r.input.replace(/^\D+/, (k) => (TEXT[lang]["kind_" + k] || k) + " #");
      const cells = [r.lane, input, TEXT[lang]["kind_" + r.kind] || r.kind, TEXT[lang]["state_" + r.state] || r.state];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 3) td.className = "state " + (r.state === "ready" || r.state === "terminal" ? "ok" : "bad");
        tr.appendChild(td);
      });
      return tr;
    });
    $("readers").replaceChildren(...rows);
    set("taps", fill(t("taps"), d.taps));

    const list = (id, items, empty, line) => {
      const lis = items.map((f) => { const li = document.createElement("li"); li.textContent = line(f); return li; });
      if (!lis.length) { const li = document.createElement("li"); li.textContent = empty; li.className = "ok"; lis.push(li); }
      $(id).replaceChildren(...lis);
    };
    list("faults", d.faults, t("no_faults"), (f) => `${f.text} (${t("since")}${when(f.since)})`);
    list("cleared-faults", d.cleared_faults.slice().reverse(), t("none"),
      (f) => `${f.text} (${t("since")}${when(f.since)}, ${t("cleared")}${when(f.cleared)})`);
    $("faults").className = d.faults.length ? "bad" : "";
  }

  let fetchedAt = 0;

  function showLogin(message) {
    $("content").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    if (timer) { clearTimeout(timer); timer = null; }
  }

  async function refresh() {
    const token = localStorage.getItem(TOKEN_KEY);
    if (!token) { showLogin(); return; }
    let answer;
    try {
      const started = performance.now();
      answer = await fetch("/status/page.json", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
      fetchedAt = (started + performance.now()) / 2;
    } catch (e) {
      const problem = set("problem", t("unreachable") + e.message);
      problem.hidden = false;
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    if (answer.status === 401 || answer.status === 403) {
      localStorage.removeItem(TOKEN_KEY);
      showLogin(t("token_refused"));
      return;
    }
    if (answer.status === 429) { showLogin(t("too_many")); return; }
    if (!answer.ok) {
      const problem = set("problem", t("unreachable") + "HTTP " + answer.status);
      problem.hidden = false;
    } else {
      last = await answer.json();
      $("problem").hidden = true;
      $("login").hidden = true;
      $("content").hidden = false;
      $("sign-out").hidden = false;
      render(last);
      document.body.dataset.loaded = "1";
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function start() {
    // A token in the address's fragment (never sent to the server) is taken and removed from the address bar.
    const m = /(?:^#|&)token=([^&]{1,200})/.exec(location.hash);
    if (m) {
      localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname);
    }
    $("lang-toggle").addEventListener("click", () => {
      lang = lang === "en" ? "zh-CN" : "en";
      localStorage.setItem(LANG_KEY, lang);
      applyLanguage();
    });
    $("sign-out").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); showLogin(); });
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const value = $("token").value.trim();
      if (value) {
        localStorage.setItem(TOKEN_KEY, value);
        $("token").value = "";
        refresh();
      }
    });
    applyLanguage();
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
