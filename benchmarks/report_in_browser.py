"""Open an analysis or repair report (report.html) in headless Chromium: a full-page screenshot, and the checks a
reader's eye makes: every image loaded, every table rendered with rows, the verdict line first, nothing wider
than the window (no sideways scrolling).

Needs Node.js with ``puppeteer-core`` and a Chromium: a local Chrome/Chromium (``--chrome PATH``), or the npm
package ``@sparticuz/chromium`` (a self-contained headless Chromium, from the npm registry), e.g.::

    npm install --prefix /tmp/browser puppeteer-core @sparticuz/chromium
    qsurgery analyze --data ../shared/data/imagenet-sample-dev --out /tmp/an
    python benchmarks/report_in_browser.py /tmp/an/report.html --node-modules /tmp/browser/node_modules \\
        --out /tmp/an/report.png

Exit status 1 when a check fails (broken image, empty table, sideways scrolling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SCRIPT = r"""
const puppeteer = require('puppeteer-core');
(async () => {
  const [url, out, width, chrome] = process.argv.slice(2);
  let executablePath = chrome, args = ['--no-sandbox'];
  if (!executablePath) {
    const chromium = require('@sparticuz/chromium');
    executablePath = await chromium.executablePath();
    args = chromium.args;
  }
  const browser = await puppeteer.launch({executablePath, args, headless: true,
                                          defaultViewport: {width: parseInt(width), height: 900}});
  const page = await browser.newPage();
  const failed = [];
  page.on('requestfailed', r => failed.push(r.url()));
  await page.goto(url, {waitUntil: 'load'});
  const facts = await page.evaluate(() => ({
    title: document.title,
    first: (document.querySelector('p') || {}).innerText || '',
    images: [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                                           width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
    tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
    scrollWidth: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  }));
  facts.failed = failed;
  await page.screenshot({path: out, fullPage: true});
  await browser.close();
  console.log(JSON.stringify(facts));
})().catch(e => { console.error(String(e)); process.exit(2); });
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="report.html")
    ap.add_argument("--out", type=Path, default=None, help="screenshot (default: report.png beside the report)")
    ap.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    ap.add_argument("--chrome", default="", help="a Chrome/Chromium executable (default: @sparticuz/chromium)")
    ap.add_argument("--node-modules", type=Path, default=None,
                    help="the node_modules folder holding puppeteer-core (and @sparticuz/chromium)")
    args = ap.parse_args()
    if not args.report.is_file():
        sys.exit(f"no report at {args.report}")
    node = shutil.which("node")
    if node is None:
        sys.exit("node (Node.js) is not on PATH: it runs the headless browser")
    out = args.out or args.report.with_suffix(".png")
    env = dict(os.environ)
    if args.node_modules is not None:
        env["NODE_PATH"] = str(args.node_modules.resolve())
    with tempfile.NamedTemporaryFile("w", suffix=".js", delete=False) as f:
        f.write(_SCRIPT)
    t = time.perf_counter()
    try:
        run = subprocess.run([node, f.name, args.report.resolve().as_uri(), str(out.resolve()), str(args.width),
                              args.chrome], capture_output=True, text=True, env=env, timeout=300)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        sys.exit(f"the browser failed: {run.stderr.strip()[-2000:]}")
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - t
    broken = [i["src"] for i in facts["images"] if not i["ok"]]
    empty = [k for k, rows in enumerate(facts["tables"]) if rows < 2]
    wide = facts["scrollWidth"] > args.width
    print(f"# {args.report} in headless Chromium ({seconds:.1f} s), window {args.width} px wide")
    print(f"title: {facts['title']!r}; first paragraph: {facts['first'][:160]!r}")
    print(f"page: {facts['height']} px tall, {facts['scrollWidth']} px wide"
          f"{' (scrolls sideways)' if wide else ''}")
    print(f"images: {len(facts['images'])} ({len(broken)} broken{': ' + ', '.join(broken[:5]) if broken else ''})")
    shrunk = [i["src"] for i in facts["images"] if i["ok"] and i["shown"] + 1 < min(i["width"], args.width - 40)]
    print(f"images shown smaller than drawn: {len(shrunk)}")
    print(f"tables: {len(facts['tables'])}, rows {facts['tables']} ({len(empty)} without a data row)")
    print(f"requests that failed: {len(facts['failed'])}")
    print(f"screenshot: {out}")
    return 1 if broken or empty or wide or facts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
