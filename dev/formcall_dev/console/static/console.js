// Live regions: each element with data-refresh is fetched again every data-interval ms and
// replaced only when its HTML changed, so a button under the pointer is not swapped for nothing.
(function () {
  "use strict";

  function live(region) {
    var interval = parseInt(region.dataset.interval, 10) || 1000;
    var last = null;

    function tick() {
      fetch(region.dataset.refresh, { cache: "no-store", headers: { "Accept": "text/html" } })
        .then(function (answer) {
          if (!answer.ok) { throw new Error("HTTP " + answer.status); }
          return answer.text();
        })
        .then(function (html) {
          if (html !== last) {
            region.innerHTML = html;
            last = html;
          }
          region.classList.remove("stale");
          region.dataset.updated = String(Date.now());
        })
        .catch(function () { region.classList.add("stale"); })
        .then(function () { window.setTimeout(tick, interval); });
    }

    window.setTimeout(tick, interval);
  }

  document.querySelectorAll("[data-refresh]").forEach(live);
})();
