# Sourced by scripts/quickstart and scripts/test: make sure .venv exists and holds the project.
# Installs only when .venv is missing or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_env() {
    local extras="$1"  # "" or "[dev]"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    local hash have stamp="$VENV/.msc-ray-installed"
    hash="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    [ "$have" = "$hash$extras" ] && return 0
    [ -z "$extras" ] && [ "$have" = "$hash[dev]" ] && return 0  # a dev install serves a plain run too
    echo "installing msc-ray$extras into $VENV (the first time this fetches torch, about 6 GB)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch and torchvision are resolved together from the registry: torchvision needs torch's CUDA build
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT$extras"
    echo "$hash$extras" > "$stamp"
}

# The page's tests drive a real headless browser: Debian's chromium and its chromedriver (same version).
# Installed with the system package manager when missing; without them those tests skip, saying why.
ensure_browser() {
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="$(command -v sudo || true)"
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; }; then
        echo "no chromium/chromedriver and no way to install them: the browser tests will skip" >&2
        return 0
    fi
    echo "installing chromium and chromium-driver for the browser tests" >&2
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "chromium could not be installed: the browser tests will skip" >&2
}
