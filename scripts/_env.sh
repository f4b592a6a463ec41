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
