// Parses an AsyncAPI document with the official parser and fails on any error or warning. The one
// information-level rule that fires, asyncapi-latest-version, is turned off: the document is written
// against AsyncAPI 3.0 on purpose (the version most tools read); any other diagnostic fails too.
// Usage: node asyncapi-validate.cjs FILE   (with NODE_PATH pointing at the installed node_modules)
"use strict";
const fs = require("fs");
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: asyncapi-validate.cjs FILE");
    process.exit(2);
  }
  const parser = new Parser({ ruleset: { rules: { "asyncapi-latest-version": "off" } } });
  const { document, diagnostics } = await parser.parse(fs.readFileSync(file, "utf8"), { source: file });
  const names = Object.fromEntries(Object.entries(DiagnosticSeverity).map(([name, value]) => [value, name]));
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? d.path.join(".") : "(document)";
    console.error(`${file}: ${names[d.severity] || d.severity}: ${d.code}: ${where}: ${d.message}`);
  }
  if (document === undefined || diagnostics.length > 0) {
    console.error(`${file}: ${diagnostics.length} diagnostic(s); the document must have none`);
    process.exit(1);
  }
  const counts = ["channels", "operations", "messages"].map((k) => `${document[k]().length} ${k}`);
  console.log(`${file}: valid AsyncAPI ${document.version()} (${counts.join(", ")}), no diagnostics`);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
