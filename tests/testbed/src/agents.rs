//! Running a real `veil-agent` on a test bed node, and asking it questions with `veilctl`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use veil_api::AgentStatus;

use crate::{
    Result, TestbedError, binaries, io_error, netns::NetNs, process::ChildGuard, topology::Topology,
};

/// How long an agent may take to attach its programs and answer `veilctl status`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `veil-agent` running inside one node's namespace.
pub struct Agent {
    node: usize,
    ns: NetNs,
    log_path: PathBuf,
    veilctl: PathBuf,
    process: ChildGuard,
}

impl Agent {
    /// Writes a config for `node`, starts the agent there and waits until it answers.
    pub fn start(topology: &Topology, node: usize) -> Result<Self> {
        Self::start_with(topology, node, None)
    }

    /// Like [`Self::start`], with Veil's overlay on VNI `vni`, fed by the
    /// topology's inventory (written now).
    pub fn start_overlay(topology: &Topology, node: usize, vni: u32) -> Result<Self> {
        topology.write_inventory()?;
        Self::start_with(topology, node, Some(vni))
    }

    /// Like [`Self::start_overlay`], with `extra` (TOML sections such as
    /// `[mesh]`) appended to the agent's config.
    pub fn start_overlay_with(
        topology: &Topology,
        node: usize,
        vni: u32,
        extra: &str,
    ) -> Result<Self> {
        Self::start_overlay_with_env(topology, node, vni, extra, &[])
    }

    /// Like [`Self::start_overlay_with`], with `env` set for the agent
    /// (e.g. `VEIL_TEST_DISABLE_FEATURES`).
    pub fn start_overlay_with_env(
        topology: &Topology,
        node: usize,
        vni: u32,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        topology.write_inventory()?;
        let config = format!("{}{extra}", config_for(topology, node, Some(vni)));
        Self::start_from_env(topology, node, config, env)
    }

    /// Like [`Self::start_overlay_with`], with no inventory file at all:
    /// `extra` must name the sources (`[kubernetes]`, `[events.kafka]`).
    pub fn start_overlay_without_inventory(
        topology: &Topology,
        node: usize,
        vni: u32,
        extra: &str,
    ) -> Result<Self> {
        let config = config_for(topology, node, Some(vni));
        let config: String = config
            .lines()
            .filter(|line| !line.starts_with("inventory = "))
            .map(|line| format!("{line}\n"))
            .collect();
        Self::start_from(topology, node, format!("{config}{extra}"))
    }

    fn start_with(topology: &Topology, node: usize, overlay_vni: Option<u32>) -> Result<Self> {
        Self::start_configured(topology, node, overlay_vni, "")
    }

    fn start_configured(
        topology: &Topology,
        node: usize,
        overlay_vni: Option<u32>,
        extra: &str,
    ) -> Result<Self> {
        let config = format!("{}{extra}", config_for(topology, node, overlay_vni));
        Self::start_from(topology, node, config)
    }

    fn start_from(topology: &Topology, node: usize, config: String) -> Result<Self> {
        Self::start_from_env(topology, node, config, &[])
    }

    fn start_from_env(
        topology: &Topology,
        node: usize,
        config: String,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let agent_bin = binaries::locate("veil-agent")?;
        let veilctl = binaries::locate("veilctl")?;
        let ns = topology.node(node);
        let config_path = topology.workdir().join(format!("agent-n{node}.toml"));
        std::fs::write(&config_path, config)
            .map_err(io_error(format!("cannot write {}", config_path.display())))?;
        let log_path = topology.workdir().join(format!("agent-n{node}.log"));
        let log = File::create(&log_path)
            .map_err(io_error(format!("cannot create {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_error("cannot duplicate the log file handle"))?;
        let mut command = ns.command(&agent_bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "VEIL_LOG",
                std::env::var("VEIL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let process = ChildGuard::spawn(&format!("veil-agent on node {node}"), command)?;
        let mut agent = Self {
            node,
            ns,
            log_path,
            veilctl,
            process,
        };
        agent.wait_until_ready()?;
        Ok(agent)
    }

    pub fn node(&self) -> usize {
        self.node
    }

    /// The agent's process id (for CPU and memory accounting).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `veilctl args…` inside the node and returns its stdout.
    pub fn veilctl(&self, args: &[&str]) -> Result<String> {
        crate::command::output_of(
            self.ns.command(&self.veilctl).args(args),
            &format!("veilctl {}", args.join(" ")),
        )
    }

    /// `GET path` on the agent's `port` from inside the node (metrics, readiness):
    /// the status code and the body.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let response = self
            .ns
            .run(move || -> std::io::Result<String> {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(request.as_bytes())?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response)
            })?
            .map_err(io_error(format!(
                "GET {path} on port {port} of node {}",
                self.node
            )))?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| TestbedError::Agent(format!("not an HTTP response: {response}")))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// The value of the metric line that starts with `series` (name and labels), if present.
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        let (_, body) = self.http_get(veil_api::DEFAULT_METRICS_PORT, veil_api::METRICS_PATH)?;
        Ok(body
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok()))
    }

    /// Runs `veilctl args…` inside the node; returns its exit code and stdout
    /// whatever the code (for commands whose exit code is the answer).
    pub fn veilctl_exit(&self, args: &[&str]) -> Result<(i32, String)> {
        let output = self
            .ns
            .command(&self.veilctl)
            .args(args)
            .output()
            .map_err(|source| TestbedError::Spawn {
                command: "veilctl".into(),
                source,
            })?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    /// `veilctl status -o json`, parsed.
    pub fn status(&self) -> Result<AgentStatus> {
        let json = self.veilctl(&["status", "-o", "json"])?;
        serde_json::from_str(&json).map_err(|error| {
            TestbedError::Agent(format!("veilctl printed unreadable JSON: {error}"))
        })
    }

    /// Whether the agent reports its event bus connected.
    pub fn bus_connected(&self) -> bool {
        self.status()
            .ok()
            .and_then(|s| s.event_bus)
            .is_some_and(|bus| bus.state == "connected")
    }

    /// Waits until the agent's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestbedError::Agent(format!(
            "node {}'s agent did not log {needle:?} within {timeout:?}; its log:\n{}",
            self.node,
            self.log()
        )))
    }

    /// Stops the agent (SIGTERM, then SIGKILL) and returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        self.process.stop().is_some_and(|status| status.success())
    }

    /// Kills the agent (SIGKILL), as a crash would: it cleans nothing up.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.exit_status() {
                return Err(TestbedError::Agent(format!(
                    "node {}'s agent exited ({status}) before it was ready; its log:\n{}",
                    self.node,
                    self.log()
                )));
            }
            if self.status().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Agent(format!(
                    "node {}'s agent did not answer `veilctl status` within {READY_TIMEOUT:?}; its log:\n{}",
                    self.node,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The agent config for `node`: its own state directory in the test bed's
/// work directory, underlay `ul0`, one veth per pod, and the overlay on VNI
/// `overlay_vni` when given (pod veths then come from the inventory).
pub fn config_for(topology: &Topology, node: usize, overlay_vni: Option<u32>) -> String {
    let pods = topology
        .pod_veths(node)
        .iter()
        .map(|veth| format!("{veth:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    // Each agent its own state (the embedded event journal): several run on
    // one host here.
    let mut config = format!(
        "node_name = \"node{node}\"\nstate_dir = \"{}\"\n\n[datapath]\nunderlay_interface = \"ul0\"\n",
        topology.workdir().join(format!("state-n{node}")).display()
    );
    match overlay_vni {
        None => config.push_str(&format!("pod_interfaces = [{pods}]\n")),
        Some(vni) => config.push_str(&format!(
            "\n[overlay]\nvni = {vni}\nunderlay_mtu = {}\ninventory = \"{}\"\n",
            topology.spec().underlay_mtu,
            topology.inventory_path().display()
        )),
    }
    config
}
