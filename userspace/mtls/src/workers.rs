//! Where a relay's second direction runs.
//!
//! Each relayed connection needs a second blocking thread (one per
//! direction). Creating and destroying a thread per connection cost about a
//! sixth of the proxy's CPU in the new-connections benchmark (clone, stack
//! mmap/munmap, TLB shootdowns, exit). So when the caller itself runs on a
//! tokio runtime's blocking pool — the agent runs every connection there —
//! the second direction goes to the same pool and reuses an idle thread.
//! Elsewhere (tests, tools) it gets a thread of its own.

use std::sync::mpsc;

/// Waits for a job started by [`spawn`].
pub struct Joiner<T>(mpsc::Receiver<T>);

/// Starts `job` on the caller's tokio blocking pool if it has one, else on a
/// new thread.
pub fn spawn<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<Joiner<T>> {
    let (done, result) = mpsc::sync_channel(1);
    let run = move || {
        let _ = done.send(job());
    };
    match tokio::runtime::Handle::try_current() {
        // Detached: the result comes back through the channel.
        Ok(runtime) => drop(runtime.spawn_blocking(run)),
        Err(_) => drop(
            std::thread::Builder::new()
                .name("relay".into())
                .spawn(run)?,
        ),
    }
    Ok(Joiner(result))
}

impl<T> Joiner<T> {
    /// The job's result; an error if it panicked (or its pool shut down
    /// before running it).
    pub fn join(self) -> std::io::Result<T> {
        self.0
            .recv()
            .map_err(|_| std::io::Error::other("relay thread panicked or was never run"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_thread_of_its_own_outside_a_runtime() {
        let caller = std::thread::current().id();
        let joiner = spawn(move || std::thread::current().id() != caller).unwrap();
        assert!(joiner.join().unwrap());
    }

    #[test]
    fn reuses_the_callers_blocking_pool() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name("pool-under-test")
            .build()
            .unwrap();
        let name = runtime
            .block_on(runtime.spawn_blocking(|| {
                spawn(|| std::thread::current().name().map(str::to_owned))
                    .unwrap()
                    .join()
                    .unwrap()
            }))
            .unwrap();
        assert_eq!(name.as_deref(), Some("pool-under-test"));
    }

    #[test]
    fn a_panicking_job_is_an_error_not_a_hang() {
        let joiner = spawn(|| -> u8 { panic!("boom") }).unwrap();
        assert!(joiner.join().is_err());
    }
}
