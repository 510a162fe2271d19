//! `cargo xtask install-node` / `uninstall-node`: Veil on a bare Linux host,
//! without Kubernetes.
//!
//! A host outside a cluster needs the agent, `veilctl`, a config and a systemd
//! unit in the usual places — and a way to take exactly those away again.
//! Install therefore keeps a manifest (`/var/lib/veil/install-manifest.json`:
//! every file it wrote with its sha256 and whether something was there before,
//! every directory it created), so that uninstall removes only what install
//! added, keeps what the operator changed since, and puts back what install
//! replaced (a replaced file is moved to a backup directory first).
//!
//! Every path is taken relative to a root directory, so [`install`] and
//! [`uninstall`] are tested against scratch roots; the CLI layer ([`install_cli`],
//! [`uninstall_cli`]) adds building the binaries and `systemctl`, which only
//! ever runs on the real root `/`. The systemd units are embedded from
//! `deploy/systemd/`, their one source.

use std::{
    fmt, fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    ebpf, paths,
    shell::{self, step},
};

/// The agent's unit, from `deploy/systemd/` (the one source of truth).
pub const AGENT_UNIT: &str = include_str!("../../deploy/systemd/veil-agent.service");
/// bpffs mount unit, installed only where the host has none of that name.
pub const BPFFS_UNIT: &str = include_str!("../../deploy/systemd/sys-fs-bpf.mount");

const AGENT_PATH: &str = "/usr/local/bin/veil-agent";
const VEILCTL_PATH: &str = "/usr/local/bin/veilctl";
const CONFIG_PATH: &str = "/etc/veil/agent.toml";
const AGENT_UNIT_PATH: &str = "/etc/systemd/system/veil-agent.service";
const BPFFS_UNIT_NAME: &str = "sys-fs-bpf.mount";
const BPFFS_UNIT_PATH: &str = "/etc/systemd/system/sys-fs-bpf.mount";
const MANIFEST_PATH: &str = "/var/lib/veil/install-manifest.json";
/// Where files that install replaced wait until uninstall puts them back.
const BACKUP_DIR: &str = "/var/lib/veil/install-backup";
/// Directories systemd reads unit files from; a `sys-fs-bpf.mount` in any of
/// them means the host already has one.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];
const MANIFEST_VERSION: u32 = 1;

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Everything goes below this directory (`/` for the real host).
    pub root: PathBuf,
    pub agent_binary: PathBuf,
    pub veilctl_binary: PathBuf,
    /// Agent config to install; `None` writes the commented example.
    pub config: Option<PathBuf>,
    /// Replace an existing `/etc/veil/agent.toml`.
    pub force_config: bool,
}

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
    /// A file that was there before install was moved to the backup
    /// directory and replaced; uninstall puts it back.
    Replaced,
    /// A file left as it is (the note says why).
    Kept,
    /// A directory install created, left because something else is in it.
    NotEmpty,
    /// Not installed (the note says why).
    Skipped,
    Removed,
    /// Removed, and the file install had replaced was put back.
    Restored,
    AlreadyGone,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
            Self::Replaced => "replaced",
            Self::Kept | Self::NotEmpty => "kept",
            Self::Skipped => "skipped",
            Self::Removed => "removed",
            Self::Restored => "restored",
            Self::AlreadyGone => "gone",
        })
    }
}

/// One line of the report: a path inside the root, what happened, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub outcome: Outcome,
    pub note: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "  {:<10} {}", self.outcome.to_string(), self.path)?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Everything one install or uninstall did, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub changes: Vec<Change>,
}

impl Report {
    fn add(&mut self, path: &str, outcome: Outcome, note: Option<String>) {
        self.changes.push(Change {
            path: path.to_owned(),
            outcome,
            note,
        });
    }

    /// True when nothing on disk changed.
    pub fn is_noop(&self) -> bool {
        self.changes.iter().all(|c| {
            matches!(
                c.outcome,
                Outcome::Unchanged | Outcome::Kept | Outcome::NotEmpty | Outcome::Skipped
            )
        })
    }

    /// True when `path` was created, updated or replaced.
    pub fn touched(&self, path: &str) -> bool {
        self.changes.iter().any(|c| {
            c.path == path
                && matches!(
                    c.outcome,
                    Outcome::Created | Outcome::Updated | Outcome::Replaced
                )
        })
    }

    /// Files left in place on purpose (changed since install, the operator's config).
    pub fn kept(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.outcome == Outcome::Kept)
    }
}

/// The install manifest, `/var/lib/veil/install-manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// Files install wrote, in install order.
    files: Vec<FileRecord>,
    /// Directories install created, parents first.
    directories: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileRecord {
    /// Absolute path on the target system (inside the root).
    path: String,
    /// Of the content install wrote.
    sha256: String,
    /// Octal, e.g. `0755`.
    mode: String,
    /// A file was there before; it waits in the backup directory.
    preexisted: bool,
}

impl Manifest {
    fn file(&self, path: &str) -> Option<&FileRecord> {
        self.files.iter().find(|f| f.path == path)
    }

    fn record_file(&mut self, record: FileRecord) {
        match self.files.iter_mut().find(|f| f.path == record.path) {
            Some(existing) => *existing = record,
            None => self.files.push(record),
        }
    }

    fn record_directory(&mut self, path: &str) {
        if !self.directories.iter().any(|d| d == path) {
            self.directories.push(path.to_owned());
        }
    }
}

/// How install treats a file that is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Ours: replaced when it differs (a foreign one is backed up first).
    Owned,
    /// The operator's once written: never replaced without `--force-config`.
    Config,
}

/// One file install wants on disk.
struct Wanted {
    path: &'static str,
    content: Vec<u8>,
    mode: u32,
    kind: Kind,
}

/// Installs Veil under `options.root`; running it again changes nothing.
///
/// The manifest is written after every change, so an install that fails
/// half-way still lists what it did, for a rerun or for uninstall.
pub fn install(options: &InstallOptions) -> Result<Report> {
    let root = Root::new(&options.root)?;
    let initial = root.read_manifest()?;
    let mut manifest = initial.clone().unwrap_or_else(|| Manifest {
        version: MANIFEST_VERSION,
        ..Manifest::default()
    });
    let mut report = Report::default();
    // Read every input before touching anything.
    let wanted = wanted_files(options, &root, &manifest, &mut report)?;
    root.create_parents(MANIFEST_PATH, &mut manifest, &mut report)?;
    let mut saved = initial.clone();
    for wanted in &wanted {
        let installed = install_file(
            &root,
            wanted,
            options.force_config,
            &mut manifest,
            &mut report,
        );
        // Also after a failure: the directories and files done so far count.
        if saved.as_ref() != Some(&manifest) {
            root.write_json(MANIFEST_PATH, &manifest)?;
            saved = Some(manifest.clone());
        }
        installed?;
    }
    let outcome = match &initial {
        None => Outcome::Created,
        Some(initial) if *initial == manifest => Outcome::Unchanged,
        Some(_) => Outcome::Updated,
    };
    if saved.as_ref() != Some(&manifest) {
        root.write_json(MANIFEST_PATH, &manifest)?;
    }
    report.add(MANIFEST_PATH, outcome, None);
    Ok(report)
}

/// Removes what install added (as the manifest lists it) and puts back what
/// it replaced. Files changed since install are kept unless `force`.
pub fn uninstall(root: &Path, force: bool) -> Result<Report> {
    let root = Root::new(root)?;
    let Some(mut manifest) = root.read_manifest()? else {
        bail!(
            "nothing to uninstall: there is no install manifest at {}. Only what \
             `cargo xtask install-node` installed (under this --root) can be removed this way",
            root.show(MANIFEST_PATH)
        );
    };
    let mut report = Report::default();
    let mut left = Vec::new();
    for record in manifest.files.iter().rev() {
        if !uninstall_file(&root, record, force, &mut report)? {
            left.push(record.clone());
        }
    }
    left.reverse();
    manifest.files = left;
    if manifest.files.is_empty() {
        remove_if_present(&root.at(MANIFEST_PATH))?;
        report.add(MANIFEST_PATH, Outcome::Removed, None);
    }
    remove_directories(&root, &mut manifest, &mut report)?;
    if !manifest.files.is_empty() {
        // What is left stays listed, so a later `--force` run can finish.
        root.write_json(MANIFEST_PATH, &manifest)?;
        let note = format!(
            "still lists the {} file(s) kept; `uninstall-node --force` removes them",
            manifest.files.len()
        );
        report.add(MANIFEST_PATH, Outcome::Updated, Some(note));
    }
    Ok(report)
}

/// The files to install, in order; the bpffs unit only where none exists.
fn wanted_files(
    options: &InstallOptions,
    root: &Root,
    manifest: &Manifest,
    report: &mut Report,
) -> Result<Vec<Wanted>> {
    let mut wanted = vec![
        Wanted {
            path: AGENT_PATH,
            content: read_source(&options.agent_binary, "--agent-binary")?,
            mode: 0o755,
            kind: Kind::Owned,
        },
        Wanted {
            path: VEILCTL_PATH,
            content: read_source(&options.veilctl_binary, "--veilctl-binary")?,
            mode: 0o755,
            kind: Kind::Owned,
        },
        Wanted {
            path: CONFIG_PATH,
            content: match &options.config {
                Some(path) => read_source(path, "--config")?,
                None => example_config(&root.hostname()).into_bytes(),
            },
            mode: 0o600,
            kind: Kind::Config,
        },
        Wanted {
            path: AGENT_UNIT_PATH,
            content: AGENT_UNIT.as_bytes().to_vec(),
            mode: 0o644,
            kind: Kind::Owned,
        },
    ];
    match foreign_bpffs_unit(root, manifest) {
        Some(existing) => report.add(
            BPFFS_UNIT_PATH,
            Outcome::Skipped,
            Some(format!("the host has its own at {existing}")),
        ),
        None => wanted.push(Wanted {
            path: BPFFS_UNIT_PATH,
            content: BPFFS_UNIT.as_bytes().to_vec(),
            mode: 0o644,
            kind: Kind::Owned,
        }),
    }
    Ok(wanted)
}

/// A `sys-fs-bpf.mount` that install did not write, if the host has one.
fn foreign_bpffs_unit(root: &Root, manifest: &Manifest) -> Option<String> {
    UNIT_DIRS
        .iter()
        .map(|dir| format!("{dir}/{BPFFS_UNIT_NAME}"))
        .find(|path| root.at(path).exists() && manifest.file(path).is_none())
}

fn read_source(path: &Path, option: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| {
        format!(
            "cannot read {} (given by {option} or built): check the path, or omit {option} \
             to use the default",
            path.display()
        )
    })
}

/// Puts one file in place, recording it; see [`Kind`] for existing files.
fn install_file(
    root: &Root,
    wanted: &Wanted,
    force_config: bool,
    manifest: &mut Manifest,
    report: &mut Report,
) -> Result<()> {
    let target = root.at(wanted.path);
    let hash = sha256(&wanted.content);
    let current = read_existing(&target)?;
    let record = manifest.file(wanted.path).cloned();
    let (outcome, note, preexisted) = match (&current, &record) {
        // Also when the operator deleted a file install had written.
        (None, record) => (
            Outcome::Created,
            None,
            record.as_ref().is_some_and(|r| r.preexisted),
        ),
        (Some((bytes, mode)), Some(record)) => {
            let current_hash = sha256(bytes);
            if current_hash == hash && *mode == wanted.mode {
                report.add(wanted.path, Outcome::Unchanged, None);
                return Ok(());
            }
            let modified = current_hash != record.sha256;
            if wanted.kind == Kind::Config && !force_config {
                let note = if current_hash == hash {
                    "its mode was changed; left as it is"
                } else if modified {
                    "changed since install; --force-config replaces it"
                } else {
                    "differs from what --config gives; --force-config replaces it"
                };
                report.add(wanted.path, Outcome::Kept, Some(note.into()));
                return Ok(());
            }
            let note = modified.then(|| "it had been changed since install".to_owned());
            (Outcome::Updated, note, record.preexisted)
        }
        (Some(_), None) if wanted.kind == Kind::Config && !force_config => {
            let note = "already there, not overwritten; --force-config replaces it (the current \
                        one is backed up and restored by uninstall-node)";
            report.add(wanted.path, Outcome::Kept, Some(note.into()));
            return Ok(());
        }
        (Some(_), None) => {
            let backup = root.backup(wanted.path, manifest, report)?;
            let note = format!("the previous one is kept at {backup} until uninstall-node");
            (Outcome::Replaced, Some(note), true)
        }
    };
    root.create_parents(wanted.path, manifest, report)?;
    write_atomically(&target, &wanted.content, wanted.mode)?;
    manifest.record_file(FileRecord {
        path: wanted.path.to_owned(),
        sha256: hash,
        mode: format!("{:04o}", wanted.mode),
        preexisted,
    });
    report.add(wanted.path, outcome, note);
    Ok(())
}

/// Removes one installed file; returns false when it is kept.
fn uninstall_file(
    root: &Root,
    record: &FileRecord,
    force: bool,
    report: &mut Report,
) -> Result<bool> {
    let target = root.at(&record.path);
    match read_existing(&target)? {
        None => report.add(&record.path, Outcome::AlreadyGone, None),
        Some((bytes, _)) if sha256(&bytes) != record.sha256 && !force => {
            let note = "changed since install: remove it yourself, or rerun with --force";
            report.add(&record.path, Outcome::Kept, Some(note.into()));
            return Ok(false);
        }
        Some(_) => {
            fs::remove_file(&target)
                .with_context(|| format!("cannot remove {}", target.display()))?;
            if !record.preexisted {
                report.add(&record.path, Outcome::Removed, None);
            }
        }
    }
    if record.preexisted {
        root.restore(&record.path)?;
        report.add(
            &record.path,
            Outcome::Restored,
            Some("the file install replaced".into()),
        );
    }
    Ok(true)
}

/// Removes the directories install created, deepest first, if empty.
fn remove_directories(root: &Root, manifest: &mut Manifest, report: &mut Report) -> Result<()> {
    let mut kept = Vec::new();
    for dir in manifest.directories.iter().rev() {
        let path = root.at(dir);
        match fs::remove_dir(&path) {
            Ok(()) => report.add(dir, Outcome::Removed, None),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                report.add(dir, Outcome::NotEmpty, Some("not empty".into()));
                kept.push(dir.clone());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    kept.reverse();
    manifest.directories = kept;
    Ok(())
}

/// A root directory; paths inside it are written as on the target system.
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "the root {} is not a directory: create it, or pass --root with an existing one",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `path` (absolute on the target system) inside this root.
    fn at(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }

    fn show(&self, path: &str) -> String {
        self.at(path).display().to_string()
    }

    /// The host's name from `<root>/etc/hostname`, if it makes a node name.
    fn hostname(&self) -> String {
        let name = fs::read_to_string(self.at("/etc/hostname")).unwrap_or_default();
        let name = name.lines().next().unwrap_or("").trim().to_owned();
        let usable = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if usable { name } else { "node1".into() }
    }

    fn read_manifest(&self) -> Result<Option<Manifest>> {
        let path = self.at(MANIFEST_PATH);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "the install manifest {} is not valid JSON of this version: restore it from a \
                 backup, or remove Veil's files by hand (they are listed in it)",
                path.display()
            )
        })?;
        if manifest.version != MANIFEST_VERSION {
            bail!(
                "the install manifest {} has version {}, this xtask reads version \
                 {MANIFEST_VERSION}: use the Veil checkout that installed it",
                path.display(),
                manifest.version
            );
        }
        Ok(Some(manifest))
    }

    fn write_json(&self, path: &str, manifest: &Manifest) -> Result<()> {
        let mut text = serde_json::to_string_pretty(manifest)?;
        text.push('\n');
        write_atomically(&self.at(path), text.as_bytes(), 0o644)
    }

    /// Creates the missing parents of `path`, recording each in the manifest.
    fn create_parents(
        &self,
        path: &str,
        manifest: &mut Manifest,
        report: &mut Report,
    ) -> Result<()> {
        let mut missing = Vec::new();
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
            if self.at(&dir.to_string_lossy()).is_dir() {
                break;
            }
            missing.push(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
        for dir in missing.iter().rev() {
            let at = self.at(dir);
            fs::create_dir(&at).with_context(|| {
                format!(
                    "cannot create {}: is the root writable by you?",
                    at.display()
                )
            })?;
            manifest.record_directory(dir);
            report.add(dir, Outcome::Created, None);
        }
        Ok(())
    }

    /// Moves the file at `path` into the backup directory; returns where.
    fn backup(&self, path: &str, manifest: &mut Manifest, report: &mut Report) -> Result<String> {
        let backup = format!("{BACKUP_DIR}{path}");
        if self.at(&backup).exists() {
            bail!(
                "{} would replace {}, but a backup is already there: Veil's install manifest \
                 was lost or edited. Move the backup away (it is an earlier original), then rerun",
                self.show(path),
                self.show(&backup)
            );
        }
        self.create_parents(&backup, manifest, report)?;
        move_file(&self.at(path), &self.at(&backup))?;
        Ok(backup)
    }

    /// Moves the backup of `path` back into place.
    fn restore(&self, path: &str) -> Result<()> {
        let backup = self.at(&format!("{BACKUP_DIR}{path}"));
        if !backup.exists() {
            bail!(
                "the file install replaced at {} should be in {}, but is not: restore it from \
                 your own backups",
                self.show(path),
                backup.display()
            );
        }
        move_file(&backup, &self.at(path))
    }
}

/// The commented example config install writes when no `--config` is given;
/// `veil-agent check-config` accepts it as it is.
pub fn example_config(node_name: &str) -> String {
    format!(
        r#"# Veil agent configuration, written by `cargo xtask install-node` as a
# starting point. After editing, check it with
#   veil-agent check-config --config /etc/veil/agent.toml
# Unknown keys are refused with their line, so a typo never silently falls
# back to a default.

# This node's name: as in the inventory's [[nodes]] and in `veilctl status`.
node_name = "{node_name}"

# Admin API for veilctl; must be a loopback address.
# admin_listen = "127.0.0.1:15000"
# Prometheus metrics (/metrics) and readiness (/healthz/ready).
# metrics_listen = "0.0.0.0:15020"
# readiness_listen = "0.0.0.0:15021"

[datapath]
# The interface that joins this host to the other nodes (see `ip -br link`).
underlay_interface = "eth0"
# Host-side veth of each local pod; none on a host without pods.
pod_interfaces = []
# auto (native, else generic) | native | generic
xdp_mode = "auto"

# The VXLAN overlay between nodes. Uncomment, and list every node and pod in
# the inventory (the same file on every node; re-read while the agent runs).
# [overlay]
# vni = 4242
# underlay_mtu = 1500                 # pods must use 50 bytes less
# inventory = "/etc/veil/inventory.toml"

# Transparent mTLS between meshed pods; needs [overlay]. Until the ECDSACert
# controller signs CSRs, each agent signs its workloads' certificates with
# this CA (workload keys are made here and never leave the host).
# [mesh]
# trust_domain = "cluster.local"
# ca_cert = "/etc/veil/ca.pem"
# ca_key = "/etc/veil/ca-key.pem"     # readable by root only (0600)
# certificate_lifetime = "24h"
# inbound_port = 15008
"#
    )
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Content and permission bits of a regular file, or `None` when absent.
fn read_existing(path: &Path) -> Result<Option<(Vec<u8>, u32)>> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if !metadata.is_file() {
        bail!(
            "{} is not a regular file (a directory or a link?): move it away and rerun",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some((bytes, metadata.permissions().mode() & 0o7777)))
}

/// Writes `path` through a temporary file in the same directory, so that a
/// crash never leaves half a binary or config behind.
fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let name = path.file_name().context("a file path has a name")?;
    let temporary = path.with_file_name(format!(".{}.veil-install", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        fs::write(&temporary, content)?;
        fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))?;
        fs::rename(&temporary, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temporary);
        anyhow::Error::new(e).context(format!(
            "cannot write {}: is it writable by you (root for /)?",
            path.display()
        ))
    })
}

/// Renames, or copies and deletes across file systems; keeps the mode.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to)
        .and_then(|_| fs::remove_file(from))
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

// ---- CLI layer: building the binaries, systemctl, messages ----

/// `cargo xtask install-node` after argument parsing.
pub struct InstallArgs {
    pub root: PathBuf,
    pub agent_binary: Option<PathBuf>,
    pub veilctl_binary: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub force_config: bool,
    pub no_start: bool,
}

pub fn install_cli(args: InstallArgs) -> Result<()> {
    let real_root = is_real_root(&args.root)?;
    if real_root {
        require_root_user("install-node")?;
    }
    let (agent_binary, veilctl_binary) = match (args.agent_binary, args.veilctl_binary) {
        (Some(agent), Some(veilctl)) => (agent, veilctl),
        (agent, veilctl) => {
            let (built_agent, built_veilctl) = build_binaries()?;
            (
                agent.unwrap_or(built_agent),
                veilctl.unwrap_or(built_veilctl),
            )
        }
    };
    if let Some(config) = &args.config {
        check_config(&agent_binary, config)?;
    }
    step(&format!("Installing Veil under {}", args.root.display()));
    let report = install(&InstallOptions {
        root: args.root.clone(),
        agent_binary,
        veilctl_binary,
        config: args.config,
        force_config: args.force_config,
    })?;
    print_report(&report);
    if report.is_noop() {
        println!("Everything was already installed: nothing changed.");
    }
    let units_changed = report.touched(AGENT_UNIT_PATH) || report.touched(BPFFS_UNIT_PATH);
    finish_install(real_root && !args.no_start, units_changed, &report)
}

/// systemd's part of install (real root only), and the next steps.
fn finish_install(use_systemctl: bool, units_changed: bool, report: &Report) -> Result<()> {
    if !use_systemctl {
        println!(
            "systemctl not called (a scratch --root, or --no-start): the units are in place, \
             systemd has not read them."
        );
        return Ok(());
    }
    if units_changed {
        step("Reloading systemd (systemctl daemon-reload)");
        shell::run(Command::new("systemctl").arg("daemon-reload")).context(
            "systemd did not reload the units: check `journalctl -b -u init.scope`, then run \
             `systemctl daemon-reload` yourself",
        )?;
    }
    let verb = if report.touched(AGENT_PATH) || report.touched(CONFIG_PATH) {
        "enable --now veil-agent` (or `systemctl restart veil-agent` if it already runs)"
    } else {
        "enable --now veil-agent`"
    };
    println!("Next: edit {CONFIG_PATH} for this host, then `systemctl {verb}.");
    println!("      `veilctl status` shows the agent once it runs.");
    Ok(())
}

/// `cargo xtask uninstall-node` after argument parsing.
pub fn uninstall_cli(root: &Path, force: bool, no_stop: bool) -> Result<()> {
    let real_root = is_real_root(root)?;
    if real_root {
        require_root_user("uninstall-node")?;
    }
    let use_systemctl = real_root && !no_stop;
    if use_systemctl && root.join(AGENT_UNIT_PATH.trim_start_matches('/')).exists() {
        stop_agent()?;
    }
    step(&format!(
        "Removing what install-node put under {}",
        root.display()
    ));
    let report = uninstall(root, force)?;
    print_report(&report);
    if use_systemctl {
        shell::run(Command::new("systemctl").arg("daemon-reload"))
            .context("run `systemctl daemon-reload` yourself so systemd forgets the units")?;
    } else {
        println!("systemctl not called (a scratch --root, or --no-stop).");
    }
    let kept: Vec<_> = report.kept().map(|c| c.path.as_str()).collect();
    if kept.is_empty() {
        println!("Veil is uninstalled.");
    } else {
        println!(
            "Kept on purpose: {} (changed since install). Remove by hand, or rerun with --force.",
            kept.join(", ")
        );
    }
    Ok(())
}

fn print_report(report: &Report) {
    for change in &report.changes {
        println!("{change}");
    }
}

/// Stops and disables the agent before its files go (real root only).
fn stop_agent() -> Result<()> {
    step("Stopping the agent (systemctl disable --now veil-agent)");
    shell::run(Command::new("systemctl").args(["disable", "--now", "veil-agent.service"])).context(
        "cannot stop the agent: stop it yourself (`systemctl disable --now veil-agent`) and \
             rerun, or pass --no-stop if systemd does not manage it",
    )
}

/// Whether `root` is this machine's `/`, where systemctl may act.
fn is_real_root(root: &Path) -> Result<bool> {
    let resolved = fs::canonicalize(root).with_context(|| {
        format!(
            "the root {} does not exist: create it, or pass an existing --root",
            root.display()
        )
    })?;
    Ok(resolved == Path::new("/"))
}

fn require_root_user(command: &str) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "{command} on / writes to /usr/local, /etc and /var/lib: run it as root \
             (`sudo -E cargo xtask {command}`), or pass --root DIR to use a scratch root"
        );
    }
    Ok(())
}

/// Builds veil-agent and veilctl (release) and returns their paths.
fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let object = ebpf::build()?;
    step("Building veil-agent and veilctl (release)");
    shell::run(
        shell::cargo()
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", &object)
            .args(["build", "--release", "-p", "veil-agent", "-p", "veilctl"]),
    )
    .context("the build failed: fix it, or pass --agent-binary and --veilctl-binary")?;
    let dir = paths::target_dir().join("release");
    Ok((dir.join("veil-agent"), dir.join("veilctl")))
}

/// Runs the agent's own `check-config` on a config given with `--config`.
fn check_config(agent_binary: &Path, config: &Path) -> Result<()> {
    step(&format!(
        "Checking {} (veil-agent check-config)",
        config.display()
    ));
    shell::run(Command::new(agent_binary).arg("check-config").arg("--config").arg(config))
        .context("the config is not valid: fix what the agent says, or omit --config to install the commented example")
}
