"""The rendered report in a real headless browser: every image of index.html loads.

Needs Chromium at /usr/bin/chromium (Debian: ``apt-get install chromium``); skipped without it. The page is loaded
from a copy with one probe script appended, which counts after the load event the images that did not decode.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench.report import render
from tests.test_report import make_results

CHROMIUM = Path("/usr/bin/chromium")
PROBE = ("<script>window.addEventListener('load', () => { const images = [...document.images];"
         " const broken = images.filter(i => !(i.complete && i.naturalWidth > 0));"
         " document.body.setAttribute('data-images', images.length + ':' + broken.length); });</script>")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium; "
                                                   "apt-get install chromium)")
def test_every_image_of_the_report_loads_in_headless_chromium(tmp_path):
    out = render(make_results(tmp_path / "results"), tmp_path / "out")
    page = (out / "index.html").read_text()
    expected = len(re.findall(r"<img ", page))
    assert expected >= 10
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert found, f"the probe did not run; chromium printed {dom[:300]!r}"
    assert (int(found.group(1)), int(found.group(2))) == (expected, 0)  # every image there, none broken
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,4000", (out / "index.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 50_000  # a page with figures, not a blank one
    assert len(re.findall(r'src="data:image/png;base64,', page)) == expected  # self-contained: all embedded
