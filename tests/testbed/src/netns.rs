//! One network namespace, and ways to do things inside it.

use std::{fs::File, path::PathBuf, process::Command};

use nix::sched::{CloneFlags, setns};

use crate::{Result, TestbedError, command, io_error};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (created with `ip netns add`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace, IPv4-only, and brings its loopback up.
    ///
    /// IPv6 is off so that link-local chatter (router solicitations, MLD)
    /// never shows up in counters or benchmarks of an IPv4 test bed.
    pub fn create(name: &str) -> Result<Self> {
        command::ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        let configured = ns
            .sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            .and_then(|()| ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1"))
            .and_then(|()| ns.ip(&["link", "set", "lo", "up"]).map(drop));
        if let Err(error) = configured {
            let _ = ns.delete();
            return Err(error);
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        command::ip(&full)
    }

    /// `ethtool args…` inside the namespace.
    pub fn ethtool(&self, args: &[&str]) -> Result<()> {
        command::output_of(
            self.command("ethtool").args(args),
            &format!(
                "ethtool {} (in {}; package ethtool)",
                args.join(" "),
                self.name
            ),
        )
        .map(drop)
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value))?
            .map_err(io_error(format!("cannot set {key} in {}", self.name)))
    }

    /// A `Command` that runs `program` inside the namespace.
    ///
    /// Uses `nsenter --net`, which (unlike `ip netns exec`) keeps the host's
    /// /sys, so cgroup2 stays visible to programs that need it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `work` on a thread that has entered the namespace.
    ///
    /// Sockets created inside `work` belong to the namespace and can be used
    /// from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())
            .map_err(io_error(format!("cannot open namespace {}", self.name)))?;
        let name = self.name.clone();
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|errno| TestbedError::Io {
                    context: format!("cannot enter namespace {name}"),
                    source: errno.into(),
                })
                .map(|()| work())
        })
        .join()
        .map_err(|_| TestbedError::Invalid(format!("a thread inside {} panicked", self.name)))?
    }

    /// Process ids of everything running inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name)
    }

    /// Kills whatever still runs inside, then deletes the namespace.
    pub fn delete(&self) -> Result<()> {
        delete_named(&self.name)
    }
}

fn pids_in(name: &str) -> Vec<i32> {
    command::ip(&["netns", "pids", name])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills processes inside `name` and deletes it.
pub fn delete_named(name: &str) -> Result<()> {
    for pid in pids_in(name) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    command::ip(&["netns", "delete", name]).map(drop)
}

/// Names of existing namespaces that start with `prefix`.
pub fn existing_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}
