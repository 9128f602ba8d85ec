#!/usr/bin/env bash
# Renders the app and tray icons from icon.svg (needs rsvg-convert from
# Debian's librsvg2-bin). The PNGs are committed; run this after editing the SVG.
set -euo pipefail
cd "$(dirname "$0")"
for size in 32 128; do rsvg-convert -w $size -h $size icon.svg -o ${size}x${size}.png; done
rsvg-convert -w 256 -h 256 icon.svg -o 128x128@2x.png
rsvg-convert -w 512 -h 512 icon.svg -o icon.png
# Tray icons: the app icon with a status dot.
for pair in ok:#22c55e failing:#f59e0b offline:#ef4444 idle:#9ca3af; do
  state=${pair%%:*}
  color=${pair#*:}
  dot="<circle cx=\"396\" cy=\"396\" r=\"96\" fill=\"$color\" stroke=\"#ffffff\" stroke-width=\"28\"/>"
  python3 -c 'import sys; s=open("icon.svg").read(); print(s.replace("</svg>", sys.argv[1] + "\n</svg>"), end="")' "$dot" > /tmp/tray-$state.svg
  rsvg-convert -w 64 -h 64 /tmp/tray-$state.svg -o tray-$state.png
done
