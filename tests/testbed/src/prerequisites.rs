//! Tests with prerequisites: how they find out, and the one CI predicate.
//!
//! A test that needs something beyond `cargo test` (root for network
//! namespaces and eBPF, a program such as `openssl`, a Kafka broker, a
//! kube-apiserver, pebble) is `#[ignore = "needs …: cargo xtask test runs it"]`,
//! so a plain `cargo test` lists it as ignored. `cargo xtask test` runs every
//! test (`-- --include-ignored`) as root with the prerequisites in place;
//! inside such a test a missing prerequisite is a failure, never a pass:
//! the helpers here panic, saying what is missing and how to get it.

/// `CI` set to anything but empty, `false` or `0`.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Panics unless the test runs as root (network namespaces, eBPF).
///
/// `what` names the test in the message.
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{what} needs root (network namespaces, eBPF): run `sudo cargo xtask test`"
    );
}

/// Panics unless `program` is on PATH (`cargo xtask setup` installs it).
///
/// `what` names the test in the message.
pub fn require_program(program: &str, what: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "{what} needs `{program}` on PATH, and it is not there: `cargo xtask setup` installs it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "needs `veil-no-such-program` on PATH")]
    fn a_missing_program_fails_the_test() {
        require_program("veil-no-such-program", "this test");
    }

    #[test]
    fn a_program_on_path_is_found() {
        require_program("sh", "this test");
    }
}
