//! Root-only tests: fail loudly in CI, skip visibly elsewhere.

use std::io::Write;

/// True when the caller may go on with a root-only test.
///
/// As root: true. Not root under `CI=true`: panics, because a CI run that
/// silently skipped the datapath tests would prove nothing. Not root outside
/// CI: prints a visible SKIPPED line (straight to stderr, past the test
/// harness's capture) and returns false.
pub fn require_root(what: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("{what} needs root, and CI=true forbids skipping it: run the tests as root");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what} needs root (network namespaces, eBPF); run `sudo cargo xtask test`"
    );
    false
}
