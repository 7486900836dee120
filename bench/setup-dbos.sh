#!/usr/bin/env bash
# Create bench/.venv-dbos (idempotent): DBOS Transact lives in its own venv so
# its dependency pins never touch the project venv (/work/main/.venv).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-dbos"
dbos_spec='dbos==3.4.*'

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi

# Skip pip entirely when the right versions are already there: re-runs stay fast.
if "$venv/bin/python" - <<'PY' 2>/dev/null; then
import importlib.metadata as md
assert md.version("dbos").startswith("3.4.")
md.version("psycopg")
md.version("psycopg-binary")
PY
    echo "setup-dbos: $venv already has dbos $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("dbos"))')"
    exit 0
fi

"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "$dbos_spec" 'psycopg[binary]'
echo "setup-dbos: installed dbos $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("dbos"))')"
