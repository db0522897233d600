#!/usr/bin/env node
// Validate LaTeX by rendering it with KaTeX.
//
// stdin:  JSON array of {"latex": "<tex source>", "display": true|false}
// stdout: JSON array (same length, same order) of {"ok": bool, "error": string|null}
//
// Every item is rendered independently, so one bad equation does not hide the
// others.  Settings are strict: unknown control sequences, malformed groups and
// anything KaTeX's strict mode flags as "not what LaTeX would do" (e.g. unicode
// text in math mode, a comment at the very end of the input) are errors.
// Standard LaTeX/AMS commands (\frac, \sum, \operatorname, \mathbb, \mathrm,
// \top, \odot, \delta, aligned/cases/pmatrix environments, ...) are accepted.
//
// Exit status: 0 when the batch was processed (whatever the per-item results),
// 2 when the input itself is not a JSON array.
"use strict";

const katex = require("katex");

function checkOne(item) {
  if (item === null || typeof item !== "object" || typeof item.latex !== "string") {
    return { ok: false, error: "item must be an object with a string \"latex\" field" };
  }
  try {
    katex.renderToString(item.latex, {
      displayMode: Boolean(item.display),
      throwOnError: true,
      strict: "error",
      trust: false,
      output: "html",
    });
    return { ok: true, error: null };
  } catch (err) {
    const message = err && err.message ? err.message : String(err);
    // KaTeX marks the error position with combining underlines (U+0332);
    // drop them so the message reads cleanly in test output.
    return { ok: false, error: message.replace(/\u0332/g, "") };
  }
}

function main() {
  const chunks = [];
  process.stdin.on("data", (chunk) => chunks.push(chunk));
  process.stdin.on("end", () => {
    let items;
    try {
      items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
      process.stderr.write(`render.js: stdin is not valid JSON: ${err.message}\n`);
      process.exit(2);
    }
    if (!Array.isArray(items)) {
      process.stderr.write("render.js: stdin must be a JSON array\n");
      process.exit(2);
    }
    process.stdout.write(JSON.stringify(items.map(checkOne)) + "\n");
  });
}

if (require.main === module) {
  main();
}

module.exports = { checkOne, katexVersion: katex.version };
