#!/usr/bin/env bash
# Cross-build siterelay for arm64 (Raspberry Pi 4/5: aarch64-unknown-linux-gnu) on an amd64
# Debian 12 machine, and run the pure-logic tests (the siterelay-proto crate) under qemu-aarch64.
#
#   image-build/cross-arm64.sh [--deb] [--no-tests]
#
#   --deb        also package the stripped binary (build-deb.sh --binary ... --arch arm64),
#                check the package's architecture and binary, and inspect it
#                (smoke-test-deb.sh --inspect)
#   --no-tests   build the binary only
#
# Output: $CARGO_TARGET_DIR (or target/)/debian-rustc/aarch64-unknown-linux-gnu/release/siterelay
# and, beside it, siterelay.stripped (the size printed at the end).
#
# Why Debian's Rust and not rustup's: rustup cannot download the aarch64 standard library on a
# machine without access to the Rust project's servers, and rustup's compiler cannot use a standard
# library built by another compiler. Debian 12 ships a newer Rust as `rustc-web` (security
# updates, for Firefox and Chromium builds) with the standard library for every Debian
# architecture as a multiarch package, `libstd-rust-web-dev:arm64`. This script uses that
# compiler and Cargo (/usr/bin/rustc, /usr/bin/cargo) for the arm64 build only; rustup's
# toolchain stays the one for everything else. Needs root the first time (apt-get).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
make_deb=0
tests=1
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) make_deb=1; shift ;;
        --no-tests) tests=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "cross-arm64.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

target=aarch64-unknown-linux-gnu
# Debian's Rust must be at least this (edition 2024 needs 1.85; the locked crates need more).
min_rustc=1.85

need=()
for p in rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    binutils-aarch64-linux-gnu qemu-user file; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "cross-arm64: installing ${need[*]} from Debian's packages"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's compiler and Cargo, by full path: rustup's come first on PATH.
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
cargo=/usr/bin/cargo
version="$($RUSTC --version)"
if ! printf '%s\n%s\n' "$min_rustc" "$(echo "$version" | awk '{print $2}')" | sort -V -C; then
    echo "cross-arm64: $version is older than $min_rustc" >&2
    exit 1
fi
[ -d "/usr/lib/rustlib/$target/lib" ] || { echo "cross-arm64: no $target standard library in /usr/lib/rustlib" >&2; exit 1; }

caller_target_dir="${CARGO_TARGET_DIR:-}"
# Its own target directory: artifacts of two compilers would keep invalidating each other.
tdir="${CARGO_TARGET_DIR:-$root/target}/debian-rustc"
export CARGO_TARGET_DIR="$tdir"
export CARGO_INCREMENTAL=0
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Test binaries run under user-mode emulation with the cross libc (libc6-arm64-cross) as their
# root. LD_LIBRARY_PATH keeps the emulated loader from taking libc.so.6 from the host's
# ld.so.cache: libstd-rust-web-dev:arm64 brings Debian's multiarch libc6:arm64 too, a different
# build of glibc 2.36, and that loader/libc mix hangs the first pthread_create (seen here).
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib)
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="${qemu[*]}"

echo "cross-arm64: $version, $($cargo --version), target dir $tdir"
start=$(date +%s)
(cd "$root" && $cargo build --release --locked --target "$target" --bin siterelay)
bin="$tdir/$target/release/siterelay"
aarch64-linux-gnu-strip -o "$bin.stripped" "$bin"
file "$bin.stripped" | grep -q 'ARM aarch64' || { echo "cross-arm64: $bin.stripped is not an aarch64 binary:" >&2; file "$bin.stripped" >&2; exit 1; }
# The binary itself, emulated: it starts, and it checks the shipped example config (which names
# certificates that are not there: a clear complaint, not a crash).
"${qemu[@]}" "$bin.stripped" --version
set +e
"${qemu[@]}" "$bin.stripped" check-config --config "$root/docs/siterelay.example.toml" > "$tdir/check-config-arm64.txt" 2>&1
rc=$?
set -e
if [ "$rc" -ne 1 ] || ! grep -q 'ca.pem' "$tdir/check-config-arm64.txt"; then
    echo "cross-arm64: check-config under qemu-aarch64 exited $rc (expected 1, naming the missing ca.pem):" >&2
    cat "$tdir/check-config-arm64.txt" >&2
    exit 1
fi
echo "cross-arm64: the arm64 binary runs under qemu-aarch64 and check-config names the missing certificates"

if [ "$tests" = 1 ]; then
    # The pure-logic tests (no I/O, no sockets), built for aarch64 and run by the runner above.
    (cd "$root" && $cargo test --locked --target "$target" -p siterelay-proto)
fi

if [ "$make_deb" = 1 ]; then
    # build-deb.sh may run `strip` on the binary it packages: on this amd64 machine that must be
    # the aarch64 one (a no-op on an already stripped binary).
    shim="$(mktemp -d)"
    ln -s "$(command -v aarch64-linux-gnu-strip)" "$shim/strip"
    # build-deb.sh runs with the caller's environment (rustup's cargo, the caller's target
    # directory, where it finds an amd64 siterelay to write the man pages with), not this
    # script's Debian-compiler settings.
    deb="$(
        unset RUSTC RUSTDOC CARGO_INCREMENTAL
        if [ -n "$caller_target_dir" ]; then export CARGO_TARGET_DIR="$caller_target_dir"; else unset CARGO_TARGET_DIR; fi
        PATH="$shim:$PATH" "$here/build-deb.sh" --binary "$bin.stripped" --arch arm64 | tail -n 1
    )"
    rm -rf "$shim"
    [ "$(dpkg-deb --field "$deb" Architecture)" = arm64 ] || { echo "cross-arm64: $deb is not Architecture: arm64" >&2; exit 1; }
    x="$(mktemp -d)"
    dpkg-deb --extract "$deb" "$x"
    file "$x/usr/bin/siterelay" | grep -q 'ARM aarch64' || { echo "cross-arm64: $deb holds no aarch64 /usr/bin/siterelay" >&2; exit 1; }
    rm -rf "$x"
    echo "cross-arm64: package $deb (Architecture: arm64, aarch64 binary)"
    # The package's own checks, without installing it (smoke-test-deb.sh's inspection).
    "$here/smoke-test-deb.sh" --inspect "$deb"
fi

echo "cross-arm64: stripped arm64 binary $(stat -c %s "$bin.stripped") bytes ($bin.stripped), $(( $(date +%s) - start )) s"
