# A content-keyed cache of built binaries, for builds that a fresh clone
# would otherwise redo although its sources are byte-identical to a build
# already made (cargo's fingerprints go by mtime and path, so they cannot
# tell). Source it from a script run at the repository's root.
#
# bin_cache_key PATH... : prints a key hashing every file under the given
# paths (tracked or not, git-ignored ones aside) and the lines read on
# stdin (the toolchain, flags, binary names: whatever else shapes the build).
# bin_cache_restore KIND KEY DIR BIN... : copies the binaries kept under
# KIND/KEY into DIR; fails (copying nothing) unless every one is kept.
# bin_cache_store KIND KEY DIR BIN... : keeps DIR's binaries under KIND/KEY;
# the three newest keys of a kind are kept.
# TIDEPOOL_BIN_CACHE=0 turns it off (restore always misses, store does
# nothing); so does a directory that is not a git checkout.

# What the product's binaries are built from: the workspace manifest and
# lock, and each library crate's manifest, build script and sources (not
# its tests or benches, which no binary contains).
# shellcheck disable=SC2034 # used by the scripts that source this file
sources="Cargo.toml Cargo.lock common/Cargo.toml common/src crds/Cargo.toml crds/build.rs crds/proto crds/src operator/Cargo.toml operator/src agent/Cargo.toml agent/src"

bin_cache_root="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}/bin-cache"

bin_cache_key() {
  [ "${TIDEPOOL_BIN_CACHE:-1}" != 0 ] && git rev-parse --git-dir >/dev/null 2>&1 || return 0
  {
    cat
    git ls-files -z --cached --others --exclude-standard -- "$@" |
      LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -c1-16
}

bin_cache_restore() {
  local kind=$1 key=$2 dir=$3 bin
  shift 3
  [ -n "$key" ] || return 1
  for bin in "$@"; do [ -x "$bin_cache_root/$kind/$key/$bin" ] || return 1; done
  mkdir -p "$dir"
  for bin in "$@"; do cp -p "$bin_cache_root/$kind/$key/$bin" "$dir/$bin"; done
  echo "bin-cache: $kind: sources unchanged since the build kept as $key; reusing its binaries (TIDEPOOL_BIN_CACHE=0 rebuilds)" >&2
}

bin_cache_store() {
  local kind=$1 key=$2 dir=$3 bin tmp old
  shift 3
  [ -n "$key" ] || return 0
  mkdir -p "$bin_cache_root/$kind"
  # Written beside, then renamed: a killed run leaves no half entry.
  tmp=$(mktemp -d "$bin_cache_root/$kind/.new.XXXXXX")
  for bin in "$@"; do cp -p "$dir/$bin" "$tmp/$bin"; done
  rm -rf "${bin_cache_root:?}/$kind/$key"
  mv "$tmp" "$bin_cache_root/$kind/$key"
  find "$bin_cache_root/$kind" -mindepth 1 -maxdepth 1 -name '.new.*' -mmin +60 -exec rm -rf {} +
  ls -1t "$bin_cache_root/$kind" | tail -n +4 | while read -r old; do rm -rf "${bin_cache_root:?}/$kind/$old"; done
}
