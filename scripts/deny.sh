#!/usr/bin/env bash
# make deny: cargo deny's checks of the dependency graph against deny.toml.
# Licences, bans (duplicate versions, wildcards) and sources always. The
# advisories check needs the RustSec database, which this machine cannot
# fetch: it runs only when a copy is already on disk (cargo deny's default
# place, $CARGO_HOME/advisory-dbs), never fetching, and otherwise is
# skipped with a line saying so.
# `deny.sh --install` only installs cargo-deny (what .ci/run does up front).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=$(scripts/install-cargo-tool.sh cargo-deny 0.20.2)
[ "${1:-}" = --install ] && exit 0
checks=(licenses bans sources)
db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if compgen -G "$db/*/advisories" >/dev/null; then
  checks+=(advisories)
else
  echo "deny: advisories not checked: no RustSec database under $db, and this machine cannot fetch one (clone https://github.com/rustsec/advisory-db there to check them)" >&2
fi
"$bin/cargo-deny" deny --frozen check --hide-inclusion-graph "${checks[@]}"
