#!/usr/bin/env bash
# Render a `wsss report` page in headless Chromium to a PNG, to check it displays:
#   scripts/render_report.sh runs/<run>/report/index.html shot.png
# The same check runs as tests/integration/test_report.py::test_report_renders_in_headless_chromium
# wherever a chromium, chromium-browser, google-chrome or headless_shell binary is on PATH.
set -euo pipefail
page=$(realpath "$1")
out=${2:-report_screenshot.png}
if [ -e "$out" ]; then echo "$out: exists; give another output file" >&2; exit 1; fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || command -v headless_shell)
"$browser" --headless --no-sandbox --disable-gpu --screenshot="$out" --window-size=1200,2400 "file://$page"
echo "screenshot: $out"
