/* The key holder's dashboard. The key lives in this tab only (sessionStorage, or memory when
 * "remember" is off); it is sent as a Bearer header to this origin's /v1 API and nowhere
 * else. No cookies are read or written. */
(function () {
  "use strict";
  var STORE = "apifast.key";
  var key = null;

  function $(id) { return document.getElementById(id); }

  function show(id, visible) { $(id).hidden = !visible; }

  function message(text) {
    $("message").textContent = text || "";
    show("message", !!text);
  }

  function api(path) {
    return fetch(path, {
      headers: {"Authorization": "Bearer " + key},
      credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer"
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) {
        if (!r.ok) {
          var err = new Error((body.error && body.error.message) || ("HTTP " + r.status));
          err.status = r.status;
          throw err;
        }
        return body;
      });
    });
  }

  function isoDay(d) { return d.toISOString().slice(0, 10); }

  function days(start, end) {
    var out = [], d = new Date(start + "T00:00:00Z"), stop = new Date(end + "T00:00:00Z");
    while (d <= stop) { out.push(isoDay(d)); d.setUTCDate(d.getUTCDate() + 1); }
    return out;
  }

  // Exact decimal addition of non-negative USD strings (up to 12 places), for the totals.
  function addUsd(a, b) {
    var scale = 12;
    function toInt(s) {
      var parts = String(s).split("."), frac = (parts[1] || "").padEnd(scale, "0").slice(0, scale);
      return BigInt(parts[0] + frac);
    }
    var sum = (toInt(a) + toInt(b)).toString().padStart(scale + 1, "0");
    var whole = sum.slice(0, -scale), frac = sum.slice(-scale).replace(/0+$/, "");
    return whole + "." + (frac.length < 2 ? frac.padEnd(2, "0") : frac);
  }

  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : "–"; }

  function usd(value) { return value === null || value === undefined ? "–" : "$" + value; }

  function renderKey(info) {
    var sub = info.object === "sub_key";  // a sub-key sees its own caps, not a balance
    $("balance").textContent = sub ? usd(info.spend_cap_usd) : "$" + info.balance_usd;
    $("balance").previousElementSibling.textContent = sub ? "Spend cap" : "Balance";
    $("available").textContent = sub ? usd(info.daily_cap_usd) : "$" + info.available_usd;
    $("available").previousElementSibling.textContent = sub ? "Daily cap" : "Available";
    $("spent").textContent = "$" + (sub ? info.usage.spent_usd : info.spent_usd);
    $("created").textContent = when(info.created_at) + " UTC";
    show("disabled", !!info.disabled);
    show("sub-key-note", sub);
    return sub;
  }

  // The key holder's sub-keys and their spend (GET /v1/keys); a sub-key sees none.
  function renderSubKeys(list) {
    var body = $("sub-keys");
    body.textContent = "";
    list.data.forEach(function (k) {
      var tr = document.createElement("tr");
      cell(tr, k.label || "–");
      cell(tr, k.id, "mono");
      cell(tr, usd(k.usage.spent_usd), "num");
      cell(tr, usd(k.usage.spent_today_usd), "num");
      cell(tr, usd(k.usage.held_usd), "num");
      cell(tr, usd(k.spend_cap_usd), "num");
      cell(tr, usd(k.daily_cap_usd), "num");
      cell(tr, k.rpm_limit === null ? "–" : String(k.rpm_limit), "num");
      cell(tr, when(k.expires_at));
      cell(tr, k.allowed_models ? k.allowed_models.join(", ") : "all");
      cell(tr, k.disabled ? "disabled" : "active");
      body.appendChild(tr);
    });
    show("no-sub-keys", list.data.length === 0);
    show("children", true);
  }

  function renderUsage(usage) {
    var labels = days(usage.start, usage.end), models = [], perModel = {}, cells = {};
    usage.data.forEach(function (row) {
      if (models.indexOf(row.model) < 0) models.push(row.model);
      perModel[row.model] = addUsd(perModel[row.model] || "0", row.cost_usd);
      cells[row.model + "|" + row.date] = row.cost_usd;
    });
    var series = models.map(function (m) {
      return {name: m, values: labels.map(function (d) { return cells[m + "|" + d] || "0"; })};
    });
    ApiFastCharts.render($("chart-daily"), {
      title: "Spend per day (USD)", unit: "usd", kind: "bar", stacked: true, x: labels, series: series
    });
    ApiFastCharts.render($("chart-models"), {
      title: "Spend per model (USD)", unit: "usd", kind: "bar", x: models,
      series: [{name: "spend", values: models.map(function (m) { return perModel[m]; })}]
    });
    $("total-spend").textContent = "$" + usage.total_cost_usd;
    $("total-requests").textContent = String(usage.total_requests);
  }

  function cell(tr, value, cls) {
    var td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function renderGenerations(list) {
    var body = $("generations");
    body.textContent = "";
    list.data.forEach(function (g) {
      var tr = document.createElement("tr");
      cell(tr, g.created_at.replace("T", " ").slice(0, 19));
      cell(tr, g.model);
      cell(tr, g.id, "mono");
      cell(tr, String(g.input_tokens), "num");
      cell(tr, String(g.output_tokens), "num");
      cell(tr, "$" + g.cost_usd, "num");
      cell(tr, g.latency_ms + " ms", "num");
      cell(tr, g.status === 200 ? "ok" : String(g.status));
      body.appendChild(tr);
    });
    show("no-generations", list.data.length === 0);
  }

  function load() {
    var span = parseInt($("range").value, 10) || 30;
    var end = new Date(), start = new Date(end.getTime() - (span - 1) * 86400000);
    message("Loading…");
    return api("/v1/key").then(function (info) {
      var sub = renderKey(info);
      show("login", false);
      show("board", true);
      show("children", false);
      return Promise.all([
        api("/v1/usage?start=" + isoDay(start) + "&end=" + isoDay(end)).then(renderUsage),
        api("/v1/generations?limit=20").then(renderGenerations),
        sub ? null : api("/v1/keys").then(renderSubKeys)
      ]);
    }).then(function () {
      message("");
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    }).catch(function (err) {
      if (err.status === 401) { forget(); message("That key was not accepted. Check it and try again."); }
      else message("Could not load: " + err.message);
    });
  }

  function forget() {
    key = null;
    sessionStorage.removeItem(STORE);
    $("key").value = "";
    show("board", false);
    show("login", true);
  }

  function start(event) {
    event.preventDefault();
    var value = $("key").value.trim();
    if (value.indexOf("af-") !== 0) { message("An ApiFast key starts with af-."); return; }
    key = value;
    $("key").value = "";
    if ($("remember").checked) sessionStorage.setItem(STORE, key);
    else sessionStorage.removeItem(STORE);
    load();
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("login").addEventListener("submit", start);
    $("forget").addEventListener("click", function () { forget(); message(""); });
    $("refresh").addEventListener("click", load);
    $("range").addEventListener("change", load);
    key = sessionStorage.getItem(STORE);
    if (key) load();
  });
})();
