#!/usr/bin/env bash
# Vendor the web pages' front-end packages from the npm registry into src/corral/web/vendor/
# (git-ignored; served by the daemon under /ui/vendor/, never from a CDN). Run at build time
# by `make web` (and so by `make run` / `make test`); needs npm and the registry, once.
#
# Each package is pinned to a version and to the registry's sha512 integrity: `npm pack`
# fetches the tarball, we check its hash ourselves, and unpack it without running any of its
# scripts. To update one: change the version, take the new hash from
# `npm view PKG@VERSION dist.integrity`, and re-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/src/corral/web/vendor}"

# dir  package@version  integrity
PACKAGES=(
  "novnc        @novnc/novnc@1.7.0                sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA=="
  "xterm        @xterm/xterm@6.0.0                sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg=="
  "xterm-fit    @xterm/addon-fit@0.11.0           sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g=="
  "uplot        uplot@1.6.32                      sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
  "spice-html5  @spice-project/spice-html5@0.2.1  sha512-NY86i+x/0ldKK89enXghsXCzWwfb5DQ91hQFu9hbyLcAfCVn+ZKoYsw7xUWX6/HQBRrdu/4F1id7SdOwNqpG9g=="
)

command -v npm >/dev/null || { echo "vendor-web: npm is missing (apt-get install npm)" >&2; exit 1; }
stamp="$DEST/.vendored"
want="$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  touch "$stamp"
  exit 0  # already there, same pins
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
for line in "${PACKAGES[@]}"; do
  read -r dir spec integrity <<<"$line"
  echo "[vendor-web] $spec"
  tarball="$(cd "$work" && npm pack --silent --ignore-scripts "$spec" | tail -n1)"
  got="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
  if [ "$got" != "$integrity" ]; then
    echo "vendor-web: $spec: integrity $got, expected $integrity" >&2
    exit 1
  fi
  mkdir -p "$work/out/$dir"
  tar -xzf "$work/$tarball" -C "$work/out/$dir" --strip-components=1 --no-same-owner
done
echo "$want" > "$work/out/.vendored"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$work/out" "$DEST"
chmod -R a+rX "$DEST"
echo "[vendor-web] into $DEST"
