#!/usr/bin/env bash
# Build the siterelay Debian package with cargo-deb, from Cargo.toml's [package.metadata.deb].
#
#   image-build/build-deb.sh                                  # release build for this machine
#   image-build/build-deb.sh --target aarch64-unknown-linux-gnu   # cross release build (needs the
#                                                             # target's toolchain), then package
#   image-build/build-deb.sh --binary PATH [--target TRIPLE | --arch amd64|arm64]
#                                                             # package an already built binary
# Options:
#   --tools-binary PATH  a siterelay that runs on this machine, to write the man pages and
#                        completions (they do not depend on the architecture). Default: the
#                        packaged binary if it runs here, else CARGO_TARGET_DIR's release or debug
#                        build for this machine, else one is built (cargo build).
#   --deb-version V      package version (default: Cargo.toml's version, revision 1)
#   --output DIR         where the .deb goes (default: <target dir>/deb)
#
# The Maintainer field names whoever builds and answers for the package a trust installs (a
# regional team, a supplier): set DEBFULLNAME and DEBEMAIL (Debian's convention) or
# SITERELAY_DEB_MAINTAINER="Name <address>". Without them the package carries Cargo.toml's
# placeholder (siterelay@example.org) and this script says so on stderr.
#
# Prints the path of the .deb. Honours CARGO_TARGET_DIR. Needs cargo-deb
# (`cargo install --locked cargo-deb`), gzip, and cargo (for `cargo tree`: the copyright file
# lists the bundled crates). What the package does: image-build/README.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
binary=""
tools=""
triple=""
arch=""
deb_version=""
output=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --target) triple="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        --tools-binary) tools="$2"; shift 2 ;;
        --deb-version) deb_version="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "build-deb.sh: $*" >&2; exit 1; }

# Debian architecture <-> Rust target triple.
triple_of() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        *) die "no target triple known for architecture '$1' (amd64 or arm64)" ;;
    esac
}
arch_of() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo amd64 ;;
        aarch64-unknown-linux-gnu) echo arm64 ;;
        *) die "no Debian architecture known for target '$1'" ;;
    esac
}
if [ -z "$triple" ]; then
    triple="$(triple_of "${arch:-$(dpkg --print-architecture)}")"
fi
[ -z "$arch" ] || [ "$(triple_of "$arch")" = "$triple" ] || die "--arch $arch does not match --target $triple"
arch="$(arch_of "$triple")"

cd "$root"
cargo deb --version >/dev/null 2>&1 || die "cargo-deb is not installed: cargo install --locked cargo-deb"
# The target directory as cargo sees it (CARGO_TARGET_DIR, .cargo/config).
target_dir="$(cargo metadata --format-version 1 --no-deps --locked \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "$target_dir" ] || die "cargo metadata gave no target directory"
output="${output:-$target_dir/deb}"

if [ -z "$binary" ]; then
    if [ "$triple" = "$(triple_of "$(dpkg --print-architecture)")" ]; then
        cargo build --release --locked --bin siterelay >&2
        binary="$target_dir/release/siterelay"
    else
        cargo build --release --locked --bin siterelay --target "$triple" >&2
        binary="$target_dir/$triple/release/siterelay"
    fi
fi
[ -f "$binary" ] && [ -x "$binary" ] || die "$binary is not an executable"

# cargo-deb packages what is in <its target dir>/<triple>/release/: a staging directory of our
# own, so a debug binary packaged here never lands where cargo keeps its release build.
stage="$target_dir/deb-stage"
rel="$stage/$triple/release"
rm -rf "$stage"
mkdir -p "$rel/deb-generated/man8" "$rel/deb-generated/man5" "$rel/deb-generated/completions" "$output"
install -m 0755 "$binary" "$rel/siterelay"
# Debug information is for developers, not for an SD card.
strip_tool=strip
[ "$arch" = arm64 ] && command -v aarch64-linux-gnu-strip >/dev/null 2>&1 && strip_tool=aarch64-linux-gnu-strip
if ! "$strip_tool" --strip-debug "$rel/siterelay" 2>/dev/null; then
    echo "build-deb.sh: note: $strip_tool could not strip the $arch binary; packaged as it is" >&2
fi

# Man pages and completions, from a siterelay that runs here.
if [ -z "$tools" ]; then
    for candidate in "$rel/siterelay" "$target_dir/release/siterelay" "$target_dir/debug/siterelay"; do
        if [ -x "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
            tools="$candidate"
            break
        fi
    done
fi
if [ -z "$tools" ]; then
    cargo build --locked --bin siterelay >&2
    tools="$target_dir/debug/siterelay"
fi
"$tools" --version >/dev/null 2>&1 || die "--tools-binary $tools does not run on this machine"
"$tools" manpages --out "$stage/man" >/dev/null
for page in "$stage"/man/*.8; do gzip -9n -c "$page" > "$rel/deb-generated/man8/$(basename "$page").gz"; done
for page in "$stage"/man/*.5; do gzip -9n -c "$page" > "$rel/deb-generated/man5/$(basename "$page").gz"; done
"$tools" completions bash > "$rel/deb-generated/completions/siterelay"
"$tools" completions zsh > "$rel/deb-generated/completions/_siterelay"
"$tools" completions fish > "$rel/deb-generated/completions/siterelay.fish"

# copyright: the DEP-5 header and licences (pkg/deb/copyright.in), then one Files paragraph per
# licence of the crates linked into this architecture's binary (normal dependencies, no proc
# macros), from Cargo.lock. vendor/<crate>-<version>/ is where `cargo vendor --versioned-dirs`
# puts each crate's source.
{
    cat pkg/deb/copyright.in
    cargo tree --locked -p siterelay -e normal,no-proc-macro --target "$triple" --prefix none \
        -f '{p}|{l}' \
        | sed 's/ (\*)$//' | grep -v '^siterelay' | sort -u \
        | awk -F'|' '{
                split($1, nv, " v"); lic = $2
                gsub("/", " OR ", lic); gsub(" OR ", " or ", lic); gsub(" AND ", " and ", lic)
                print lic "|" nv[1] "-" nv[2]
            }' \
        | sort -t'|' -k1,1 -k2,2 \
        | awk -F'|' '
            $1 != lic {
                if (lic != "") printf "Copyright: the authors of each crate (its Cargo.toml and licence file)\nLicense: %s\n", lic
                lic = $1; printf "\nFiles:"
            }
            { printf " vendor/%s/*\n", $2 }
            END { if (lic != "") printf "Copyright: the authors of each crate (its Cargo.toml and licence file)\nLicense: %s\n", lic }'
} > "$rel/deb-generated/copyright"

version_args=()
[ -z "$deb_version" ] || version_args=(--deb-version "$deb_version")
maintainer="${SITERELAY_DEB_MAINTAINER:-}"
if [ -z "$maintainer" ] && [ -n "${DEBFULLNAME:-}" ] && [ -n "${DEBEMAIL:-}" ]; then
    maintainer="$DEBFULLNAME <$DEBEMAIL>"
fi
if [ -n "$maintainer" ]; then
    [[ "$maintainer" =~ ^[^\<\>]+\ \<[^\<\>@\ ]+@[^\<\>\ ]+\>$ ]] || die "Maintainer must read 'Name <address>', not: $maintainer"
    version_args+=(--maintainer "$maintainer")
else
    echo "build-deb.sh: note: Maintainer is Cargo.toml's placeholder; set DEBFULLNAME and DEBEMAIL (or SITERELAY_DEB_MAINTAINER) to the team that ships this package" >&2
fi
CARGO_TARGET_DIR="$stage" cargo deb --no-build --no-strip --locked --target "$triple" \
    --output "$output" "${version_args[@]}" >/dev/null
deb="$(ls -t "$output"/siterelay_*_"$arch".deb | head -1)"
echo "$deb"
