// The results page: live bars from the SSE stream of this origin, and a receipt check.
// No build step; everything is written with textContent (no HTML from the server's data).
"use strict";
(function () {
  const poll = decodeURIComponent(location.pathname.split("/")[2] || "");
  const byId = (id) => document.getElementById(id);
  byId("poll").textContent = poll;

  function render(results) {
    const status = byId("status");
    status.textContent = results.final ? "final" : "provisional";
    status.className = results.final ? "final" : "provisional";
    byId("total").textContent = String(results.total);
    byId("embargo").hidden = !results.embargoed;
    const bars = byId("bars");
    bars.replaceChildren();
    const most = Math.max(1, ...Object.values(results.counts));
    for (const [option, count] of Object.entries(results.counts)) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.dataset.option = option;
      const label = document.createElement("div");
      label.className = "label";
      const name = document.createElement("span");
      name.textContent = option;
      const value = document.createElement("span");
      value.className = "count";
      value.textContent = String(count);
      label.append(name, value);
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * count / most) + "%";
      bar.append(label, fill);
      bars.append(bar);
    }
    const rejected = byId("rejected");
    rejected.replaceChildren();
    for (const [reason, count] of Object.entries(results.rejected)) {
      const item = document.createElement("li");
      item.textContent = reason + ": " + count;
      rejected.append(item);
    }
    renderBreakdown("regions", results.regions || {});
    renderBreakdown("countries", results.countries || {});
  }

  // One row per region or country: its name, then "option count" per option.
  function renderBreakdown(name, breakdown) {
    byId(name + "-section").hidden = Object.keys(breakdown).length === 0;
    const table = byId(name);
    table.replaceChildren();
    for (const [key, counts] of Object.entries(breakdown)) {
      const row = document.createElement("tr");
      const head = document.createElement("th");
      head.textContent = key;
      row.append(head);
      for (const [option, count] of Object.entries(counts)) {
        const cell = document.createElement("td");
        cell.textContent = option + " " + count;
        row.append(cell);
      }
      table.append(row);
    }
  }

  const base = "/v1/polls/" + encodeURIComponent(poll) + "/results";
  fetch(base).then((answer) => answer.ok ? answer.json() : null)
    .then((results) => { if (results) render(results); })
    .catch(() => {});
  const stream = new EventSource(base + "/stream");
  stream.addEventListener("results", (event) => {
    const results = JSON.parse(event.data);
    render(results);
    if (results.final) stream.close();
  });

  byId("check").addEventListener("click", async () => {
    const out = byId("receipt-result");
    const text = byId("receipt").value.trim();
    out.textContent = "checking";
    try {
      const answer = await fetch("/v1/receipts/" + encodeURIComponent(text));
      const body = await answer.json();
      if (!answer.ok) {
        out.textContent = "not a valid receipt: " + (body.detail || answer.status);
        return;
      }
      const words = {counted: "counted", "not-counted": "not counted", pending: "pending"};
      out.textContent = (words[body.status] || body.status) + " (option " + body.option +
        ", " + (body.final ? "final" : "provisional") + ")";
    } catch (error) {
      out.textContent = "could not check the receipt: " + error;
    }
  });
})();
