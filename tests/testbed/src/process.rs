//! Processes a test bed starts: stopped on drop, never left behind.

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Result, TestbedError};

/// How long a process gets to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ChildGuard {
    name: String,
    child: Child,
}

impl ChildGuard {
    /// Spawns `command` in its own process group, so a Ctrl-C at the terminal
    /// reaches the test bed's owner, which then stops its children in order.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self> {
        command.process_group(0);
        let child = command.spawn().map_err(|source| TestbedError::Spawn {
            command: name.into(),
            source,
        })?;
        Ok(Self {
            name: name.into(),
            child,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to the grace period, then kills.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Some(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// SIGKILL, as a crash would end it: no handler runs, the kernel closes
    /// its sockets. Waits until it has exited.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}
