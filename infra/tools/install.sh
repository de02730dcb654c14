#!/usr/bin/env bash
# Installs actionlint, the GitHub Actions workflow linter that tests/infra/test_workflows.py runs, into
# .tools/bin. Idempotent: an actionlint of the pinned version already there is kept. Usage:
#   bash infra/tools/install.sh        # prints the actionlint path on its last line
#
# It builds actionlint from source with `go install` (about 20 s, module downloads from the Go module proxy).
# Go: the `go` on PATH, else /usr/local/go/bin/go, else (as root, with apt-get) the distribution's golang-go.
# actionlint ACTIONLINT_VERSION's go.mod asks for Go $GO_NEEDED: a Go 1.21+ fetches that toolchain from the
# Go module proxy by itself (GOTOOLCHAIN=auto); an older one (Debian 12's golang-go is 1.19) cannot, so the
# same toolchain module (golang.org/toolchain) is fetched here with `go mod download` and built with.
# Exit status: 0 installed, 3 no Go here (tests may skip on that outside CI), 1 any other failure.
set -euo pipefail

ACTIONLINT_VERSION=v1.7.12 # the newest the Go proxy serves (2026-11); Dependabot does not track this pin
GO_NEEDED=1.25.0           # the `go` line of actionlint v1.7.12's go.mod

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.tools/bin"
actionlint="$bin/actionlint"

fail() {
  echo "infra/tools/install.sh: $2" >&2
  exit "$1"
}

if [ -x "$actionlint" ] && [ "$("$actionlint" -version 2>/dev/null | head -n 1)" = "$ACTIONLINT_VERSION" ]; then
  echo "$actionlint"
  exit 0
fi

go="$(command -v go || true)"
if [ -z "$go" ] && [ -x /usr/local/go/bin/go ]; then
  go=/usr/local/go/bin/go
fi
if [ -z "$go" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "no Go found: installing golang-go with apt-get" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; }; then
      fail 1 "apt-get install golang-go failed"
    fi
    go="$(command -v go)" || fail 1 "apt-get installed golang-go but there is no go on PATH"
  else
    fail 3 "Go is missing: install Go 1.21 or newer (https://go.dev/dl/, or apt-get install golang-go on \
Debian 13 / Ubuntu 24.04) and run this again; it builds actionlint $ACTIONLINT_VERSION into .tools/bin"
  fi
fi

version="$("$go" env GOVERSION)" # go1.19.8, go1.26.8, ...
minor="$(echo "$version" | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
[ -n "$minor" ] || fail 1 "cannot read the version of $go ($version)"
if [ "$minor" -lt 21 ]; then
  # No automatic toolchain switch before Go 1.21: fetch the toolchain as a module (the proxy serves it as
  # golang.org/toolchain@v0.0.1-goX.Y.Z.GOOS-GOARCH) and make its programs executable, as Go 1.21+ does.
  module="golang.org/toolchain@v0.0.1-go$GO_NEEDED.$("$go" env GOOS)-$("$go" env GOARCH)"
  echo "$version is older than 1.21: fetching $module from the Go module proxy" >&2
  dir="$(GOFLAGS=-modcacherw "$go" mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -n "$dir" ] && [ -f "$dir/bin/go" ] || fail 1 "could not fetch $module with $version"
  chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/*
  go="$dir/bin/go"
fi

mkdir -p "$bin"
echo "building actionlint $ACTIONLINT_VERSION with $version into $bin" >&2
GOBIN="$bin" GOTOOLCHAIN=auto GOFLAGS=-modcacherw "$go" install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" \
  || fail 1 "go install github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION failed (is the Go module proxy reachable?)"
echo "$actionlint"
