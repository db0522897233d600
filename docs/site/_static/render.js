// Renders every formula of the page with the bundled KaTeX (no network): each element of class "tex"
// holds one formula's LaTeX source; "display" ones are set as display math. A formula KaTeX refuses is
// marked "katex-error", shown as its source in red and reported on the console, never silently dropped.
(function () {
  "use strict";
  var nodes = document.querySelectorAll(".tex"), failed = 0;
  for (var k = 0; k < nodes.length; k++) {
    var el = nodes[k], source = el.textContent;
    try {
      katex.render(source, el, { displayMode: el.classList.contains("display"), throwOnError: true,
                                 strict: "ignore", output: "htmlAndMathml" });
    } catch (err) {
      failed++;
      el.classList.add("katex-error");
      el.title = String(err && err.message);
      console.error("KaTeX could not render " + JSON.stringify(source) + ": " + el.title);
    }
  }
  document.documentElement.setAttribute("data-formulas", String(nodes.length));
  document.documentElement.setAttribute("data-formula-errors", String(failed));
})();
