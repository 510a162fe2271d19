//! etcd and kube-apiserver as child processes that never outlive the test.
//!
//! Each runs in its own process group, with its output in a log file, and is
//! stopped (SIGTERM to the group, SIGKILL after a grace period) when its
//! guard drops, which also happens when a test panics. If the test process
//! itself is killed, the kernel sends the child SIGKILL (parent-death signal),
//! so nothing is left holding ports or files.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{KubeBedError, Result};

/// How long a process gets to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// A child process, in its own process group, stopped when dropped.
pub struct GroupChild {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl GroupChild {
    /// Starts `command` with stdout and stderr appended to `log`.
    ///
    /// The parent-death signal is bound to the calling thread: call this from
    /// the thread that owns the guard (an async test's runtime thread is).
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> Result<Self> {
        let io = |what: String| move |source| KubeBedError::Io { what, source };
        let stdout = File::create(log).map_err(io(format!("cannot create {}", log.display())))?;
        let stderr = stdout
            .try_clone()
            .map_err(io(format!("cannot reopen {}", log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the prctl(2) system call, which is async-signal-safe; it
        // touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().map_err(|source| KubeBedError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// An error saying that the process exited, with the end of its log.
    pub fn exited_error(&mut self, status: ExitStatus) -> KubeBedError {
        KubeBedError::Exited {
            name: self.name,
            status,
            log_tail: log_tail(&self.log),
        }
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGTERM to the process group, SIGKILL after [`GRACE`].
    pub fn stop(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last 40 lines of `log` (or why it cannot be read).
pub fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(40);
            format!(
                "{} (last lines):\n{}",
                log.display(),
                lines[start..].join("\n")
            )
        }
        Err(error) => format!("{}: {error}", log.display()),
    }
}
