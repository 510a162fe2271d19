//! The underlay program of the `direct-xdp` and `kernel-vxlan-xdp` baselines.
//!
//! Native XDP on a veth changes how the kernel moves packets through it:
//! the peer loses GSO (every TCP super-packet is cut into MTU frames before
//! the veth), and each frame is copied into a page-pool buffer before the
//! program runs. Veil's overlay must attach XDP to the underlay, the kernel
//! vxlan device does not, so on a veth test bed the two differ by more than
//! their own work. These baselines attach a program that passes every frame
//! (`perf/bpf/xdp_pass.c`, built with clang at set-up) to the underlay of
//! direct routing and of the kernel vxlan device to measure that difference
//! directly.

use std::path::{Path, PathBuf};

use veil_testbed::netns::NetNs;

use crate::{BenchError, Result, io_error};

/// The program's source, compiled at set-up so the bench needs no
/// prebuilt object.
const SOURCE: &str = include_str!("../bpf/xdp_pass.c");

/// Builds the program into `workdir` and returns the object's path.
pub fn build(workdir: &Path) -> Result<PathBuf> {
    let source = workdir.join("xdp_pass.c");
    let object = workdir.join("xdp_pass.o");
    std::fs::write(&source, SOURCE)
        .map_err(io_error(format!("cannot write {}", source.display())))?;
    let output = std::process::Command::new("clang")
        .args(["-O2", "-g0", "-target", "bpf", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .output()
        .map_err(|e| {
            failed(format!(
                "cannot run clang (install it: apt install clang): {e}"
            ))
        })?;
    if !output.status.success() {
        return Err(failed(format!(
            "clang could not build {}: {}",
            source.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(object)
}

/// Attaches the program in native (driver) mode to `device` in `ns`.
pub fn attach(ns: &NetNs, device: &str, object: &Path) -> Result<()> {
    let object = object.to_string_lossy();
    ns.ip(&[
        "link", "set", "dev", device, "xdpdrv", "obj", &object, "sec", "xdp",
    ])
    .map_err(|e| failed(format!("cannot attach XDP to {device}: {e}")))?;
    Ok(())
}

fn failed(problem: String) -> BenchError {
    BenchError::Configuration {
        configuration: "direct-xdp, kernel-vxlan-xdp",
        problem,
    }
}
