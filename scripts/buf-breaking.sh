#!/usr/bin/env bash
# `buf breaking`: the contracts in proto/ (as they are in the working tree) against the
# contracts they replace, so a change that would break an existing client fails lint.
#
# What they replace:
#   BUF_BREAKING_AGAINST=REV   any git revision, e.g. the last release tag
#   otherwise, ahead of main   where HEAD forked from main (origin/main, else main)
#   otherwise (on main)        the previous commit: each commit on main stays
#                              compatible with the one before it
# The old contracts are read with `git archive`, so nothing is cloned or fetched. A
# clone that has no such commit (a shallow clone, the first commit) has nothing to
# compare with: the check is skipped, saying why, instead of failing.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-node_modules/.bin/buf}

resolve() { git rev-parse --verify --quiet "$1^{commit}" 2>/dev/null || true; }

head=$(resolve HEAD)
if [ -z "$head" ]; then
  echo "buf breaking: skipped: no commit yet, so no contracts were released"
  exit 0
fi
base=""
if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
  base=$(resolve "$BUF_BREAKING_AGAINST")
  if [ -z "$base" ]; then
    echo "buf breaking: BUF_BREAKING_AGAINST=$BUF_BREAKING_AGAINST is not a commit here" >&2
    exit 2
  fi
else
  for upstream in origin/main main; do
    ref=$(resolve "$upstream")
    [ -n "$ref" ] || continue
    fork=$(git merge-base "$head" "$ref" 2>/dev/null || true)
    if [ -n "$fork" ] && [ "$fork" != "$head" ]; then
      base=$fork
      break
    fi
  done
  if [ -z "$base" ]; then
    base=$(resolve HEAD~1)
  fi
  if [ -z "$base" ]; then
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
      echo "buf breaking: skipped: this shallow clone has no commit before HEAD;" \
        "\`git fetch --deepen=1\` (or BUF_BREAKING_AGAINST=REV) gives it one"
    else
      echo "buf breaking: skipped: HEAD is the first commit, so no contracts were released before it"
    fi
    exit 0
  fi
fi

if ! git cat-file -e "$base:proto" 2>/dev/null; then
  echo "buf breaking: skipped: $(git rev-parse --short "$base") has no proto/ to compare with"
  exit 0
fi
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
git archive "$base" proto | tar -x -C "$old"
cp buf.yaml "$old/buf.yaml"
echo "buf breaking: proto/ against $(git rev-parse --short "$base")"
"$BUF" breaking --against "$old"
