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

/// True when `program` is on PATH. Missing under `CI=true`: panics (CI must
/// install it: `cargo xtask setup` does). Missing elsewhere: prints SKIPPED.
pub fn require_program(program: &str, what: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!(
            "{what} needs `{program}`, and CI=true forbids skipping it: run `cargo xtask setup`"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what} needs `{program}`; `cargo xtask setup` installs it"
    );
    false
}
