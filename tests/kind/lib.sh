# Shared by the scripts in tests/kind: where things are cached, how they
# report, and the keys that name cached artifacts. Source it; do not run it.

kind_dir=$(cd "${BASH_SOURCE[0]%/*}" && pwd)
repo_dir=$(cd "$kind_dir/../.." && pwd)
# shellcheck source=versions.sh
. "$kind_dir/versions.sh"
cache_dir="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$repo_dir/tests/cluster/go.mod")

# `say` reports progress on stderr (stdout carries each script's result);
# `die` reports what is wrong and what to do, then exits.
say() { echo "${log_prefix:-kind}: $*" >&2; }
die() { echo "${log_prefix:-kind}: error: $*" >&2; exit 1; }

# `need CMD WHAT` fails naming the command and the package that provides it.
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed; $2"; }

# Installs Debian packages when this is a Debian machine where we may.
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "these packages are missing and cannot be installed here (needs root and apt-get): $*; install them and retry"
  fi
  say "installing $* (apt-get)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$cache_dir/apt.log" 2>&1; then
    apt-get update -qq >>"$cache_dir/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$cache_dir/apt.log" 2>&1 ||
      { tail -n 20 "$cache_dir/apt.log" >&2; die "apt-get install $* failed; see $cache_dir/apt.log"; }
  fi
}

# The node image's cache key: every pin and every file of its recipe.
node_key() {
  (
    cat "$kind_dir/versions.sh" "$repo_dir/tests/cluster/go.mod" "$repo_dir/tests/cluster/go.sum" \
      "$kind_dir/lib.sh" "$kind_dir/node-image.sh"
    find "$kind_dir/node" "$kind_dir/coredns" -type f | LC_ALL=C sort | xargs cat
  ) | sha256sum | cut -c1-16
}

mkdir -p "$cache_dir"
