//! `cargo xtask vm-test`: the agent's suites on other kernels, in qemu VMs.
//!
//! This host's kernel is one build of one version, without kernel TLS. Nodes
//! run others, so the suites that matter most run again on Debian 12's 6.1
//! (the oldest kernel Veil supports) and on Debian's 6.12, both of which
//! have the TLS ULP: the kTLS crate tests, the programs on crafted packets,
//! the datapath counters, the overlay (cross-node TCP and UDP, drops by
//! reason), the mesh (STRICT refusal, allow rules, a revocation resetting a
//! session) and the kernel suite (fallbacks, kTLS with the kernel's
//! counters as proof, a kTLS agent against a userspace one).
//!
//! KVM does not work on these machines, so qemu emulates the CPU (TCG):
//! results are functional, never performance. The VM's root is this host's
//! filesystem ([`initramfs`]), so it runs the test binaries `cargo xtask
//! test` built, unchanged.

mod boot;
mod initramfs;
mod kernels;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    paths,
    shell::{self, step},
};

pub use kernels::MATRIX;

/// One test target run in the VM, with the tests of it that run there.
struct Suite {
    /// Its name in logs and the summary.
    name: &'static str,
    package: &'static str,
    target: &'static str,
    /// A feature of `package` the target needs (`required-features`).
    feature: Option<&'static str>,
    /// Test name filters (substrings); empty: every test of the target.
    filters: &'static [&'static str],
}

/// What runs on each kernel. Chosen to fit CI's time under emulation: the
/// heaviest transfers of the host suites (100 MiB, 16 parallel clients) and
/// the tests of one node's own logic (MTU checks, moves, veilctl) stay on
/// the host.
const SUITES: &[Suite] = &[
    Suite {
        name: "mtls-ktls",
        package: "veil-mtls",
        target: "ktls_vm",
        feature: Some("vm-tests"),
        filters: &[],
    },
    Suite {
        name: "mtls-session-relay",
        package: "veil-mtls",
        target: "session_relay",
        feature: None,
        filters: &[],
    },
    Suite {
        name: "program-verdicts",
        package: "veil-agent",
        target: "program_verdicts",
        feature: None,
        filters: &[],
    },
    Suite {
        name: "datapath-counters",
        package: "veil-e2e",
        target: "datapath_counters",
        feature: None,
        filters: &[],
    },
    Suite {
        name: "overlay",
        package: "veil-e2e",
        target: "overlay",
        feature: None,
        filters: &[
            "icmp_tcp_and_udp_cross_nodes_and_stay_local_within_a_node",
            "malformed_vxlan_is_dropped_and_counted_by_reason_and_never_reaches_a_pod",
        ],
    },
    Suite {
        name: "mesh",
        package: "veil-e2e",
        target: "mesh",
        feature: None,
        filters: &[
            "strict_pods_refuse_plaintext_and_agents_refuse_bad_peers",
            "connections_between_pods_of_one_node_meet_the_allow_rules_too",
            "certificates_and_identities_revoked_on_the_bus_are_refused_everywhere_and_their_owners_rekey",
        ],
    },
    Suite {
        name: "kernel",
        package: "veil-e2e",
        target: "kernel",
        feature: None,
        filters: &[],
    },
];

/// The entries of `all` that `names` name (all of them when `names` is
/// empty); a name that matches none is refused, `describe` saying what it
/// was meant to be.
fn select<'a, T>(
    all: &'a [T],
    names: &[String],
    name_of: impl Fn(&T) -> &str,
    describe: impl Fn(&str) -> String,
) -> Result<Vec<&'a T>> {
    if let Some(unknown) = names
        .iter()
        .find(|n| !all.iter().any(|entry| name_of(entry) == n.as_str()))
    {
        bail!(
            "no {}; choose from {}",
            describe(unknown),
            all.iter().map(&name_of).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(all
        .iter()
        .filter(|entry| names.is_empty() || names.iter().any(|n| n == name_of(entry)))
        .collect())
}

/// How long one VM may run its whole plan before it is stopped as failed.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs the suites on `kernels` (names from [`MATRIX`]; empty: all), or
/// only the suites named in `only`.
pub fn run(ebpf_object: &Path, kernels: &[String], only: &[String]) -> Result<()> {
    let selected: Vec<kernels::KernelSpec> = select(
        MATRIX,
        kernels,
        |k| k.name,
        |n| format!("kernel {n} in the matrix"),
    )?
    .into_iter()
    .copied()
    .collect();
    let suites: Vec<&Suite> = select(SUITES, only, |s| s.name, |n| format!("suite {n}"))?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the VM tests need root (qemu shares / with the VM): run `sudo -E cargo xtask vm-test`"
        );
    }
    let cache = paths::cache_dir().join("vm");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;

    step("Building the test binaries the VMs run");
    let binaries = build_suites(ebpf_object, &suites)?;
    let mut failed = Vec::new();
    for spec in selected {
        step(&format!(
            "Kernel {} ({}) in a qemu VM (TCG emulation: functional results only)",
            spec.name, spec.description
        ));
        let kernel = kernels::ensure(spec, &cache)?;
        let initrd = initramfs::build(&cache, &kernel)?;
        let job = cache.join(format!("job-{}", spec.name));
        let _ = std::fs::remove_dir_all(&job);
        std::fs::create_dir_all(&job)?;
        std::fs::write(job.join("plan.sh"), plan_script(&suites, &binaries))?;
        let outcome = boot::run(&kernel, &initrd, &job, VM_TIMEOUT)?;
        println!(
            "    kernel {}: {} in {:.0?}; logs in {}",
            kernel.release,
            if outcome.passed() {
                "every suite passed"
            } else {
                "FAILED"
            },
            outcome.elapsed,
            job.display()
        );
        for suite in &outcome.suites {
            println!(
                "      {:<20} {:<6} {:>5}s  {}",
                suite.name,
                if suite.code == 0 { "ok" } else { "FAILED" },
                suite.seconds,
                suite.summary
            );
        }
        if !outcome.passed() {
            failed.push(format!("{} ({})", spec.name, kernel.release));
        }
    }
    ensure!(
        failed.is_empty(),
        "the VM suites failed on kernel(s) {}: see the logs above",
        failed.join(", ")
    );
    Ok(())
}

/// Builds every suite's test binary (the host's own test build, so nothing
/// is compiled twice) and returns each suite's executable.
fn build_suites(ebpf_object: &Path, suites: &[&Suite]) -> Result<Vec<(String, PathBuf)>> {
    let mut executables = Vec::new();
    // Targets without a feature come from the workspace's test build; a
    // feature-gated one is built for its package with the feature.
    let plain: Vec<&&Suite> = suites.iter().filter(|s| s.feature.is_none()).collect();
    if !plain.is_empty() {
        let messages = cargo_test_no_run(ebpf_object, &["--workspace"])?;
        for suite in plain {
            executables.push((suite.name.to_string(), executable(&messages, suite)?));
        }
    }
    for suite in suites.iter().filter(|s| s.feature.is_some()) {
        let feature = suite.feature.unwrap_or_default();
        let messages = cargo_test_no_run(
            ebpf_object,
            &[
                "-p",
                suite.package,
                "--features",
                feature,
                "--test",
                suite.target,
            ],
        )?;
        executables.push((suite.name.to_string(), executable(&messages, suite)?));
    }
    // The agents, veilctl and the controller the e2e suites start.
    shell::run(
        shell::cargo()
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", ebpf_object)
            .args(["build", "--workspace", "--bins", "--quiet"]),
    )?;
    Ok(executables)
}

fn cargo_test_no_run(ebpf_object: &Path, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let output = shell::cargo()
        .current_dir(paths::repo_root())
        .env("VEIL_EBPF_OBJECT", ebpf_object)
        .args(["test", "--no-run", "--quiet", "--message-format=json"])
        .args(args)
        .output()
        .context("cannot run cargo")?;
    ensure!(
        output.status.success(),
        "building the VM's test binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

fn executable(messages: &[serde_json::Value], suite: &Suite) -> Result<PathBuf> {
    messages
        .iter()
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == suite.target
                && m["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains(&format!("#{}@", suite.package)))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| {
            format!(
                "cargo built no {} test executable for {}",
                suite.target, suite.package
            )
        })
}

/// The shell script the VM runs: each suite's binary with its filters, its
/// output in the job directory, one line per suite on the console.
fn plan_script(suites: &[&Suite], binaries: &[(String, PathBuf)]) -> String {
    let job = initramfs::JOB_MOUNT;
    let bin_dir = paths::debug_bin_dir();
    let mut script = format!(
        r#"#!/bin/sh
# Written by `cargo xtask vm-test`; runs inside the VM.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root CI=true RUST_BACKTRACE=1 VEIL_LOG=info
export VEIL_BIN_DIR={bin_dir} VEIL_CACHE_DIR={cache}
cd /tmp
echo "VEIL-VM-KERNEL $(uname -r)"
status=0
run() {{
    name=$1; shift
    echo "VEIL-VM-SUITE-START $name"
    start=$(date +%s)
    "$@" > {job}/$name.log 2>&1
    code=$?
    summary=$(grep -E '^test result:' {job}/$name.log | tail -n 1)
    echo "VEIL-VM-SUITE-END $name $code $(( $(date +%s) - start )) $summary"
    if [ $code -ne 0 ]; then
        status=1
        grep -E '^test .* FAILED|panicked at' {job}/$name.log | head -n 20
        tail -n 40 {job}/$name.log
    fi
}}
"#,
        bin_dir = bin_dir.display(),
        cache = paths::cache_dir().display(),
    );
    for suite in suites {
        let Some((_, binary)) = binaries.iter().find(|(name, _)| name == suite.name) else {
            continue;
        };
        script.push_str(&format!(
            "run {} {} --include-ignored --test-threads=1 {}\n",
            suite.name,
            binary.display(),
            suite.filters.join(" ")
        ));
    }
    script.push_str("exit $status\n");
    script
}
