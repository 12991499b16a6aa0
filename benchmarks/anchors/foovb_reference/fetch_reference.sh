#!/usr/bin/env bash
# Materialises an unmodified checkout of github.com/chenzeno/FOO-VB OUTSIDE this
# repository, for run_reference.py --reference-dir.
#
#   ./fetch_reference.sh SOURCE DEST [REV]
#
# SOURCE: a git directory of the reference (e.g. a bare mirror such as
#   /work/.mirror/chenzeno+FOO-VB/repo), or anything `git clone` accepts
#   (https://github.com/chenzeno/FOO-VB.git) if the machine can reach it.
# DEST:   an empty or new directory (keep it outside the sparse_jax repo).
# REV:    commit to extract (default HEAD; the harness was written against
#   5aa9aaa4ce10705b0ef40a8e52076486c33df854).
# The resolved commit is written to DEST/REFERENCE_COMMIT.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
src=$1 dest=$2 rev=${3:-HEAD}
mkdir -p "$dest"
if [ -n "$(ls -A "$dest")" ]; then
  echo "$dest is not empty" >&2; exit 1
fi
if git --git-dir="$src" rev-parse --verify -q "$rev^{commit}" >/dev/null 2>&1; then
  commit=$(git --git-dir="$src" rev-parse "$rev^{commit}")
  git --git-dir="$src" archive "$commit" | tar -x -C "$dest"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  git clone -q "$src" "$tmp/repo"
  commit=$(git -C "$tmp/repo" rev-parse "$rev^{commit}")
  git -C "$tmp/repo" archive "$commit" | tar -x -C "$dest"
fi
echo "$commit" > "$dest/REFERENCE_COMMIT"
echo "chenzeno/FOO-VB $commit -> $dest"
