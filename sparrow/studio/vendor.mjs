// Copies the page's npm dependencies into static/vendor/, with their licences, and
// records what was copied (version and SHA-256 of each file) in static/vendor/vendored.json.
// Run with `npm run vendor` after `npm install` (docs/studio.md).
import { createHash } from "node:crypto";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";

const FILES = {
  "wavesurfer.js": { "dist/wavesurfer.esm.js": "wavesurfer.esm.js", LICENSE: "wavesurfer.LICENSE" },
};

const record = {};
for (const [name, files] of Object.entries(FILES)) {
  const from = `node_modules/${name}`;
  const { version } = JSON.parse(readFileSync(`${from}/package.json`, "utf8"));
  const sha256 = {};
  for (const [source, target] of Object.entries(files)) {
    copyFileSync(`${from}/${source}`, `static/vendor/${target}`);
    sha256[target] = createHash("sha256").update(readFileSync(`static/vendor/${target}`)).digest("hex");
  }
  record[name] = { version, sha256 };
}
writeFileSync("static/vendor/vendored.json", `${JSON.stringify(record, null, 2)}\n`);
