#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its WebDriver for the browser test of the
# MLflow UI (tests/test_ui_browser.py). Called by `make test` (so by .ci/run) and, as a
# fallback, by the test itself.
#
# Idempotent and fast: when /usr/bin/chromium and /usr/bin/chromedriver are already there it
# only checks that and exits. It installs only as root with apt-get present; elsewhere it
# says why and exits 0, and the test then skips with that reason -- except under CI=true,
# where the test fails instead, so a missing browser can never hide behind a skip.
# Debian's packages are used on purpose: selenium's own driver download (selenium-manager)
# would need the network, which CI does not have beyond the package registries.
set -euo pipefail

CHROMIUM=${SIMTUNE_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${SIMTUNE_CHROMEDRIVER:-/usr/bin/chromedriver}

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
  exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: $CHROMIUM / $CHROMEDRIVER missing and not root with apt-get;" \
    "install Debian's chromium and chromium-driver to run the browser test" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# No recommends: they pull in desktop services (upower, notification daemons, printing)
# that a headless browser never uses. fonts-liberation is the one recommend worth having:
# without a Latin font set, the screenshots render text with whatever fallback is there.
pkgs=(chromium chromium-driver fonts-liberation)
log=/tmp/simtune-install-browser.log  # the browser test quotes it when it fails in CI
: >"$log"
apt_install() {
  # Wait for the dpkg lock rather than fail when another apt run holds it.
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${pkgs[@]}" \
    >>"$log" 2>&1
}

echo "install-browser: installing ${pkgs[*]} with apt-get" >&2
# A fresh machine's package lists can be empty or stale (404 on an old version): update
# only when the first try fails, so a machine with good lists skips the slow update.
if ! apt_install; then
  apt-get update -qq -o DPkg::Lock::Timeout=300 >>"$log" 2>&1 || true
  if ! apt_install; then
    # Not fatal here: the rest of the suite still runs, and the browser test reports the
    # missing browser (a failure under CI=true, a skip elsewhere).
    echo "install-browser: apt-get install failed; last lines of its log:" >&2
    tail -n 20 "$log" >&2
    exit 0
  fi
fi
# Debian's launcher script prints a harmless shell warning on some machines; the version
# line is what matters.
"$CHROMIUM" --version >&2 || true
