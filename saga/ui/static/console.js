// kafka-saga console: live counts by status, and a confirmation before every action.
(function () {
  "use strict";
  function refreshCounts() {
    var box = document.getElementById("counts");
    if (!box) return;
    fetch("/api/counts", { headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) return;
        box.querySelectorAll("[data-count]").forEach(function (el) {
          var key = el.getAttribute("data-count");
          var n = key === "total" ? data.total : data.counts[key];
          el.textContent = (n || 0).toLocaleString("en");
        });
        box.setAttribute("data-loaded", "1");
      })
      .catch(function () {});
  }
  document.addEventListener("DOMContentLoaded", function () {
    refreshCounts();
    setInterval(refreshCounts, 5000);
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  });
})();
