// Live pages: every second, fetch the page's live part (rendered by the server, as JSON) and
// swap it in when it changed; stop once the batch or job has finished. No reload, no framework.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || live.hasAttribute("data-finished")) return;
  const url = live.getAttribute("data-live");
  let last = null;
  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.ok) {
        const data = await response.json();
        if (data.html !== last) {
          live.innerHTML = data.html;
          last = data.html;
        }
        if (data.finished) return;
      }
    } catch (e) {
      // the console or the farm is restarting: try again on the next tick
    }
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 1000);
})();
