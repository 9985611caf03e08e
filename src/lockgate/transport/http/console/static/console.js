// Live refresh of the traffic page: re-reads /console/api/traffic/<model> every two seconds and
// updates the weights table and the canary summary in place (the region is aria-live="polite").
(function () {
  "use strict";
  var root = document.getElementById("traffic");
  if (!root) { return; }
  var model = root.getAttribute("data-model");
  var url = "/console/api/traffic/" + encodeURIComponent(model);

  function cell(tag, text) { var el = document.createElement(tag); el.textContent = text; return el; }

  function renderWeights(status) {
    var table = document.getElementById("weights");
    var body = table.querySelector("tbody");
    var rows = document.createDocumentFragment();
    (status.weights || []).forEach(function (w) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-version", w.version);
      var th = cell("th", "version " + w.version); th.setAttribute("scope", "row");
      var weight = cell("td", String(w.weight)); weight.className = "weight";
      var share = document.createElement("td");
      var meter = document.createElement("meter");
      meter.min = 0; meter.max = 100; meter.value = w.share;
      meter.setAttribute("aria-label", "share of version " + w.version);
      var text = cell("span", " " + w.share + "%"); text.className = "share";
      share.appendChild(meter); share.appendChild(text);
      tr.appendChild(th); tr.appendChild(weight); tr.appendChild(share);
      rows.appendChild(tr);
    });
    body.replaceChildren(rows);
    table.hidden = !(status.weights || []).length;
    var revision = document.getElementById("revision");
    if (revision && status.revision !== undefined) { revision.textContent = String(status.revision); }
  }

  function renderCanary(status) {
    var box = document.getElementById("canary");
    var c = status.canary;
    if (!c) { return; }
    var summary = box.querySelector("p");
    if (summary) {
      summary.textContent = "Version " + c.canary + " against stable " + c.stable + ": " + c.state + ", step " +
        (c.step_index + 1) + " of " + c.steps.length + " (" + c.percent + "%), failures " + c.failures + " of " +
        c.failure_limit + (c.reason ? "; " + c.reason : "") + ".";
    }
    var progress = box.querySelector("progress");
    if (progress) { progress.max = c.steps.length; progress.value = c.step_index + 1; }
  }

  function refresh() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (status) { if (status) { renderWeights(status); renderCanary(status); root.setAttribute("data-refreshed", String(Date.now())); } })
      .catch(function () { /* the next tick tries again */ });
  }
  setInterval(refresh, 2000);
})();
