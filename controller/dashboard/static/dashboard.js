// Swap in each page's live part as its /events stream sends it. No build step, no dependencies.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.dataset.events) { return; }
  var source = new EventSource(live.dataset.events);
  source.onmessage = function (event) { live.innerHTML = event.data; };
  source.addEventListener("gone", function () { source.close(); window.location.href = "/login"; });
  // Close at once when the tab goes, so the controller's stream thread ends now, not at its next write.
  window.addEventListener("pagehide", function () { source.close(); });
})();
