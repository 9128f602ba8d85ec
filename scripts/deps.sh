# Sourced by the scripts: installs the Debian packages a command needs when
# they are missing. Root runs apt-get directly; others use sudo.

_apt_updated=
_apt_install() {
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "installing missing packages: $*" >&2
  if [ -z "$_apt_updated" ]; then
    "${sudo[@]}" apt-get update -qq
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_packages PROGRAM:PACKAGE ...  (installs PACKAGE when PROGRAM is not on PATH)
ensure_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || _apt_install "${missing[@]}"
}

# ensure_debs PACKAGE ...  (installs the packages dpkg does not know as installed)
ensure_debs() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] || _apt_install "${missing[@]}"
}

# What building the desktop app (Tauri 2, WebKitGTK) needs.
TAURI_BUILD_DEBS=(pkg-config libwebkit2gtk-4.1-dev libgtk-3-dev libayatana-appindicator3-dev
  librsvg2-dev libssl-dev libxdo-dev)
