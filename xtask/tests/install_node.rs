//! `cargo xtask install-node` / `uninstall-node` against scratch roots: the
//! files, their modes and contents, idempotence, and that uninstall leaves
//! the tree exactly as it found it (or keeps what the operator changed).
//!
//! The real binary runs with `--root <tempdir>` and small fake binaries, so
//! nothing is built, nothing needs root, and systemctl is never called.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use veil_agent::config::AgentConfig;

const CAPABILITIES: [&str; 5] = [
    "CAP_BPF",
    "CAP_NET_ADMIN",
    "CAP_PERFMON",
    "CAP_SYS_RESOURCE",
    "CAP_NET_RAW",
];

/// A scratch root with unrelated files (and a symlink) install must not touch.
struct Scratch {
    _dir: TempDir,
    root: PathBuf,
    agent: PathBuf,
    veilctl: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let inputs = dir.path().join("inputs");
        fs::create_dir_all(&inputs).unwrap();
        let agent = inputs.join("veil-agent");
        // Stands in for the agent: `check-config` succeeds and says it ran.
        write(&agent, "#!/bin/sh\necho \"fake agent: $*\"\n", 0o755);
        let veilctl = inputs.join("veilctl");
        write(&veilctl, "#!/bin/sh\necho fake veilctl\n", 0o700);
        write(&root.join("etc/hostname"), "testhost\n", 0o644);
        write(&root.join("etc/fstab"), "# nothing\n", 0o644);
        write(&root.join("usr/local/bin/other-tool"), "#!/bin/sh\n", 0o755);
        write(&root.join("var/log/syslog"), "boot\n", 0o640);
        let wants = root.join("etc/systemd/system/multi-user.target.wants");
        fs::create_dir_all(&wants).unwrap();
        symlink("/lib/systemd/system/ssh.service", wants.join("ssh.service")).unwrap();
        Self {
            _dir: dir,
            root,
            agent,
            veilctl,
        }
    }

    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Runs install-node with the fake binaries; must succeed.
    fn install(&self, extra: &[&str]) -> String {
        succeed(self.try_install(extra))
    }

    fn try_install(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "install-node".to_owned(),
            "--root".into(),
            self.root.display().to_string(),
            "--agent-binary".into(),
            self.agent.display().to_string(),
            "--veilctl-binary".into(),
            self.veilctl.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        xtask(&args)
    }

    fn uninstall(&self, extra: &[&str]) -> String {
        let mut args = vec![
            "uninstall-node".to_owned(),
            "--root".into(),
            self.root.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        succeed(xtask(&args))
    }

    fn snapshot(&self) -> Tree {
        snapshot(&self.root)
    }

    fn manifest(&self) -> serde_json::Value {
        let text = fs::read_to_string(self.path("/var/lib/veil/install-manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

/// Path → "dir 0755" / "file 0644 <sha256>" / "link -> target".
type Tree = BTreeMap<String, String>;

fn snapshot(root: &Path) -> Tree {
    let mut tree = Tree::new();
    walk(root, root, &mut tree);
    tree
}

fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let metadata = fs::symlink_metadata(&path).unwrap();
        let mode = metadata.permissions().mode() & 0o7777;
        if metadata.file_type().is_symlink() {
            let target = fs::read_link(&path).unwrap();
            tree.insert(name, format!("link -> {}", target.display()));
        } else if metadata.is_dir() {
            tree.insert(name, format!("dir {mode:04o}"));
            walk(root, &path, tree);
        } else {
            let hash = format!("{:x}", Sha256::digest(fs::read(&path).unwrap()));
            tree.insert(name, format!("file {mode:04o} {hash}"));
        }
    }
}

/// Fails with a readable diff when the trees differ.
fn assert_same_tree(expected: &Tree, actual: &Tree, context: &str) {
    let mut diff = Vec::new();
    for (path, entry) in expected {
        match actual.get(path) {
            None => diff.push(format!("- {path}: {entry} (missing now)")),
            Some(now) if now != entry => diff.push(format!("~ {path}: {entry} -> {now}")),
            Some(_) => {}
        }
    }
    for (path, entry) in actual {
        if !expected.contains_key(path) {
            diff.push(format!("+ {path}: {entry} (left behind)"));
        }
    }
    assert!(diff.is_empty(), "{context}:\n{}", diff.join("\n"));
}

/// Turns `# key = value` and `# [section]` lines into settings.
fn uncomment_settings(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn write(path: &Path, content: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn xtask(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("the xtask binary runs")
}

fn succeed(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "xtask failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The report line of `path`, e.g. "  unchanged  /etc/veil/agent.toml".
fn line_of<'a>(stdout: &'a str, path: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(path))
        .unwrap_or_else(|| panic!("no report line for {path}:\n{stdout}"))
}

#[test]
fn install_is_idempotent_and_uninstall_restores_the_tree_exactly() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();

    let first = scratch.install(&[]);
    for path in [
        "/usr/local/bin/veil-agent",
        "/usr/local/bin/veilctl",
        "/etc/veil/agent.toml",
        "/etc/systemd/system/veil-agent.service",
        "/etc/systemd/system/sys-fs-bpf.mount",
        "/var/lib/veil/install-manifest.json",
    ] {
        assert!(line_of(&first, path).contains("created"), "{first}");
    }
    assert!(first.contains("systemctl not called"), "{first}");
    assert_eq!(mode(&scratch.path("/usr/local/bin/veil-agent")), 0o755);
    assert_eq!(mode(&scratch.path("/usr/local/bin/veilctl")), 0o755);
    assert_eq!(mode(&scratch.path("/etc/veil/agent.toml")), 0o600);
    assert_eq!(
        mode(&scratch.path("/etc/systemd/system/veil-agent.service")),
        0o644
    );
    assert_eq!(
        fs::read(scratch.path("/usr/local/bin/veil-agent")).unwrap(),
        fs::read(&scratch.agent).unwrap()
    );

    // The example config is what the agent itself accepts, named after the host.
    let config_path = scratch.path("/etc/veil/agent.toml");
    let config = AgentConfig::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node_name, "testhost");
    assert_eq!(config.datapath.underlay_interface, "eth0");
    // So are its commented-out settings, once uncommented.
    let uncommented = uncomment_settings(&fs::read_to_string(&config_path).unwrap());
    let full = AgentConfig::parse(&uncommented, &config_path)
        .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert!(
        full.overlay.is_some() && full.mesh.is_some(),
        "{uncommented}"
    );
    assert!(full.admin_listen.ip().is_loopback());

    // The manifest lists exactly what was created, with matching hashes.
    let manifest = scratch.manifest();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 5, "{manifest:#}");
    for file in files {
        let path = scratch.path(file["path"].as_str().unwrap());
        let hash = format!("{:x}", Sha256::digest(fs::read(&path).unwrap()));
        assert_eq!(file["sha256"], hash.as_str(), "{}", path.display());
        assert_eq!(file["preexisted"], false);
    }
    let directories: Vec<&str> = manifest["directories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(directories, ["/var/lib", "/var/lib/veil", "/etc/veil"]);

    let installed = scratch.snapshot();
    let second = scratch.install(&[]);
    for line in second.lines().filter(|l| l.starts_with("  ")) {
        assert!(line.trim_start().starts_with("unchanged"), "{second}");
    }
    assert!(second.contains("nothing changed"), "{second}");
    assert_same_tree(
        &installed,
        &scratch.snapshot(),
        "the second install changed the tree",
    );

    let uninstall = scratch.uninstall(&[]);
    assert!(uninstall.contains("Veil is uninstalled"), "{uninstall}");
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "uninstall did not restore the tree",
    );
}

#[test]
fn the_unit_runs_the_agent_with_only_the_documented_capabilities() {
    let scratch = Scratch::new();
    scratch.install(&[]);
    let unit = fs::read_to_string(scratch.path("/etc/systemd/system/veil-agent.service")).unwrap();
    let lines: Vec<&str> = unit.lines().collect();
    for expected in [
        "ExecStart=/usr/local/bin/veil-agent run --config /etc/veil/agent.toml",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf /var/lib/veil",
        "StateDirectory=veil",
    ] {
        assert!(
            lines.contains(&expected),
            "missing {expected:?} in:\n{unit}"
        );
    }
    for setting in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let line = lines.iter().find(|l| l.starts_with(setting)).unwrap();
        let mut capabilities: Vec<&str> = line[setting.len()..].split_whitespace().collect();
        capabilities.sort();
        let mut expected = CAPABILITIES.to_vec();
        expected.sort();
        assert_eq!(capabilities, expected, "{line}");
    }
    for capability in CAPABILITIES {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("# {capability}:"))),
            "{capability} has no comment saying why:\n{unit}"
        );
    }
}

#[test]
fn an_existing_config_is_kept_and_survives_uninstall() {
    let scratch = Scratch::new();
    let mine = "node_name = \"mine\"\n[datapath]\nunderlay_interface = \"ens5\"\n";
    write(&scratch.path("/etc/veil/agent.toml"), mine, 0o640);
    let before = scratch.snapshot();

    let install = scratch.install(&[]);
    let line = line_of(&install, "/etc/veil/agent.toml");
    assert!(
        line.contains("kept") && line.contains("--force-config"),
        "{install}"
    );
    assert_eq!(
        fs::read_to_string(scratch.path("/etc/veil/agent.toml")).unwrap(),
        mine
    );
    assert_eq!(mode(&scratch.path("/etc/veil/agent.toml")), 0o640);
    let manifest = scratch.manifest();
    assert!(
        !manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "/etc/veil/agent.toml"),
        "{manifest:#}"
    );

    scratch.uninstall(&[]);
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "uninstall touched the operator's config",
    );
}

#[test]
fn force_config_replaces_and_uninstall_puts_the_originals_back() {
    let scratch = Scratch::new();
    write(
        &scratch.path("/etc/veil/agent.toml"),
        "node_name = \"old\"\n",
        0o640,
    );
    write(
        &scratch.path("/usr/local/bin/veilctl"),
        "an older veilctl\n",
        0o755,
    );
    let new_config = scratch.root.parent().unwrap().join("inputs/agent.toml");
    let text = "node_name = \"new\"\n[datapath]\nunderlay_interface = \"ens5\"\n";
    write(&new_config, text, 0o644);
    let before = scratch.snapshot();

    let config_arg = new_config.display().to_string();
    let install = scratch.install(&["--config", &config_arg, "--force-config"]);
    // The agent's own check-config ran on the given file first.
    assert!(
        install.contains(&format!("fake agent: check-config --config {config_arg}")),
        "{install}"
    );
    assert!(
        line_of(&install, "/etc/veil/agent.toml").contains("replaced"),
        "{install}"
    );
    assert!(
        line_of(&install, "/usr/local/bin/veilctl").contains("replaced"),
        "{install}"
    );
    assert_eq!(
        fs::read_to_string(scratch.path("/etc/veil/agent.toml")).unwrap(),
        text
    );
    assert_eq!(mode(&scratch.path("/etc/veil/agent.toml")), 0o600);

    // Again with the same inputs: nothing to do.
    let again = scratch.install(&["--config", &config_arg, "--force-config"]);
    assert!(again.contains("nothing changed"), "{again}");

    let uninstall = scratch.uninstall(&[]);
    assert!(
        line_of(&uninstall, "/usr/local/bin/veilctl").contains("restored"),
        "{uninstall}"
    );
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "uninstall did not put the originals back",
    );
}

#[test]
fn uninstall_keeps_a_file_changed_since_install_unless_forced() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    scratch.install(&[]);
    let config = scratch.path("/etc/veil/agent.toml");
    let edited = format!("{}# my change\n", fs::read_to_string(&config).unwrap());
    fs::write(&config, &edited).unwrap();

    // A reinstall does not overwrite the edit either.
    let reinstall = scratch.install(&[]);
    assert!(
        line_of(&reinstall, "/etc/veil/agent.toml").contains("kept"),
        "{reinstall}"
    );

    let uninstall = scratch.uninstall(&[]);
    let line = line_of(&uninstall, "/etc/veil/agent.toml");
    assert!(
        line.contains("kept") && line.contains("--force"),
        "{uninstall}"
    );
    assert!(
        uninstall.contains("Kept on purpose: /etc/veil/agent.toml (changed since install)"),
        "{uninstall}"
    );
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);
    assert!(!scratch.path("/usr/local/bin/veil-agent").exists());
    let manifest = scratch.manifest();
    let left: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["/etc/veil/agent.toml"]);

    scratch.uninstall(&["--force"]);
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "--force did not finish the uninstall",
    );
}

#[test]
fn a_host_bpffs_mount_unit_is_left_alone() {
    let scratch = Scratch::new();
    write(
        &scratch.path("/lib/systemd/system/sys-fs-bpf.mount"),
        "[Mount]\n",
        0o644,
    );
    let before = scratch.snapshot();
    let install = scratch.install(&[]);
    let line = line_of(&install, "/etc/systemd/system/sys-fs-bpf.mount");
    assert!(
        line.contains("skipped") && line.contains("/lib/systemd/system"),
        "{install}"
    );
    assert!(
        !scratch
            .path("/etc/systemd/system/sys-fs-bpf.mount")
            .exists()
    );
    scratch.uninstall(&[]);
    assert_same_tree(&before, &scratch.snapshot(), "uninstall changed the tree");
}

#[test]
fn errors_say_what_to_do() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let root = scratch.root.display().to_string();

    let output = xtask(&["uninstall-node".into(), "--root".into(), root.clone()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing to uninstall"), "{stderr}");

    let output = xtask(&[
        "install-node".into(),
        "--root".into(),
        root,
        "--agent-binary".into(),
        "/nonexistent/veil-agent".into(),
        "--veilctl-binary".into(),
        scratch.veilctl.display().to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--agent-binary"), "{stderr}");
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "a failed command changed the tree",
    );

    let output = xtask(&[
        "install-node".into(),
        "--root".into(),
        scratch.path("/does-not-exist").display().to_string(),
        "--agent-binary".into(),
        scratch.agent.display().to_string(),
        "--veilctl-binary".into(),
        scratch.veilctl.display().to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pass an existing --root"), "{stderr}");
}

#[test]
fn a_failed_install_still_lists_what_it_did_so_uninstall_cleans_up() {
    let scratch = Scratch::new();
    // Something in the way of the unit: install stops there.
    fs::create_dir_all(scratch.path("/etc/systemd/system/veil-agent.service")).unwrap();
    let before = scratch.snapshot();
    let output = scratch.try_install(&[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a regular file") && stderr.contains("move it away"),
        "{stderr}"
    );
    assert!(scratch.path("/usr/local/bin/veil-agent").exists());
    scratch.uninstall(&[]);
    assert_same_tree(
        &before,
        &scratch.snapshot(),
        "the half install was not undone",
    );
}
