//! Workload identity issuance: how fast the controller signs, and how long a
//! new pod waits for its certificate.
//!
//! **Signing** (in process, no API server): the controller's own issue path
//! — `LocalIssuer::decide`: the CSR parsed and its signature checked, the
//! identity and lifetime validated, the leaf signed by the intermediate, the
//! status built — over CSRs made beforehand, on every core, beside the bare
//! ECDSA P-256 signature it is built on (ring, through rcgen), same threads,
//! same count.
//!
//! **Pod → certificate ready** (a real kube-apiserver + etcd started here,
//! the real `veil-controller` binary): `pods` pods, each with its own service
//! account (the worst case: one certificate per pod), are created on `nodes`
//! simulated nodes, paced at `rate` per second and then as one burst. Each
//! simulated node runs the agent's issuance code — a pod watch on its node
//! (field selector `spec.nodeName`) feeding the agent's `WorkloadStore` with
//! its `KubernetesSigner` (key made on the node, CSR written into an
//! `ECDSACert`, the chain picked up by the node's one watch on its
//! `ECDSACert`s), batches
//! issued as the agent's certificate keeper does (`ensure_all`, 32 at once) —
//! without the datapath (these pods have no veth). Latency per pod: its
//! create call starting → its certificate in the node's store.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use serde::Serialize;
use veil_agent::mesh::{signer::KubernetesSigner, workloads::WorkloadStore};
use veil_controller::{
    issuance::{DEFAULT_DURATION, Decision, LocalIssuer},
    placement::Placement,
};
use veil_crd::ECDSACertSpec;
use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, renewal::RenewalPolicy};

use crate::{cpu, machine::Machine};

const TRUST_DOMAIN: &str = "cluster.local";
/// The goals of the identity issue.
pub const GOAL_SIGNATURES_PER_S: f64 = 2000.0;
pub const GOAL_P99: Duration = Duration::from_secs(1);
/// Certificates a node issues at once (as the agent's keeper).
const ISSUE_PARALLELISM: usize = 32;
/// How long one scenario may take before it is reported incomplete.
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum IdentityBenchError {
    #[error("{0}")]
    Setup(String),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Incomplete(String),
    #[error("cannot write the results: {0}")]
    Write(#[from] std::io::Error),
}

fn setup(what: &str) -> impl Fn(String) -> IdentityBenchError + '_ {
    move |error| IdentityBenchError::Setup(format!("{what}: {error}"))
}

#[derive(Clone, Debug)]
pub struct IdentityOptions {
    pub output: PathBuf,
    /// CSRs signed in the signing part.
    pub signatures: usize,
    pub pods: usize,
    pub nodes: usize,
    /// Pods created per second in the paced scenario.
    pub rate: u32,
}

impl IdentityOptions {
    pub fn new(output: PathBuf, quick: bool) -> Self {
        Self {
            output,
            signatures: if quick { 2_000 } else { 10_000 },
            pods: if quick { 200 } else { 1_000 },
            nodes: 10,
            rate: 100,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SigningResults {
    pub threads: usize,
    pub signatures: usize,
    /// CSR → signed status, through the controller's issue path.
    pub issued_per_s: f64,
    /// Bare ECDSA P-256 signatures (the floor of the cost).
    pub bare_signatures_per_s: f64,
    pub goal_per_s: f64,
    pub goal_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResults {
    pub name: String,
    pub pods: usize,
    pub nodes: usize,
    /// Pods created per second (wanted; 0 = as fast as possible).
    pub rate_wanted: u32,
    pub rate_achieved: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// First create → last certificate ready.
    pub duration_s: f64,
    /// Certificates ready per second over the scenario.
    pub certificates_per_s: f64,
    /// CPU over the scenario (% of one core): `veil-controller`, the API
    /// server, etcd, and this process (the simulated nodes and the pod
    /// creator).
    pub controller_cpu_percent: f64,
    pub apiserver_cpu_percent: f64,
    pub etcd_cpu_percent: f64,
    pub nodes_cpu_percent: f64,
    /// The whole machine's CPU busy over the scenario (% of all cores):
    /// API server, etcd, controller and the simulated nodes share it.
    pub machine_busy_percent: f64,
    pub goal_p99_ms: f64,
    pub goal_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityResults {
    pub started: String,
    pub machine: String,
    pub signing: SigningResults,
    pub scenarios: Vec<ScenarioResults>,
}

/// Runs both parts; returns the results and the report's path.
pub fn run(options: &IdentityOptions) -> Result<(IdentityResults, PathBuf), IdentityBenchError> {
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    eprintln!(
        "signing {} CSRs through the controller's issue path ...",
        options.signatures
    );
    let signing = signing(options.signatures)?;
    eprintln!(
        "  {:.0} issued/s, {:.0} bare signatures/s on {} threads",
        signing.issued_per_s, signing.bare_signatures_per_s, signing.threads
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let scenarios = runtime.block_on(pods_to_ready(options))?;
    let results = IdentityResults {
        started,
        machine: Machine::describe().one_line(),
        signing,
        scenarios,
    };
    let path = write(&options.output, &results)?;
    Ok((results, path))
}

/// Threads for the in-process part: every core.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work(i)` for `i` in `0..count` on every core; returns the seconds.
fn timed_on_all_cores(
    count: usize,
    work: impl Fn(usize) -> Result<(), String> + Sync,
) -> Result<f64, String> {
    let next = AtomicUsize::new(0);
    let failure = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads() {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if let Err(error) = work(i) {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                        break;
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(error) => Err(error),
        None => Ok(seconds),
    }
}

fn signing(count: usize) -> Result<SigningResults, IdentityBenchError> {
    let issuer = LocalIssuer {
        ca: CertificateAuthority::generate(TRUST_DOMAIN, DEFAULT_DURATION)
            .map_err(|e| setup("the CA")(e.to_string()))?,
        renewal: RenewalPolicy::default(),
    };
    // The CSRs, as node agents would write them (not timed).
    let specs: Vec<Mutex<Option<ECDSACertSpec>>> = (0..count).map(|_| Mutex::new(None)).collect();
    timed_on_all_cores(count, |i| {
        let identity = SpiffeId::new(TRUST_DOMAIN, "bench", &format!("sa-{i:05}"))
            .map_err(|e| e.to_string())?;
        let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
        let csr = key.csr_pem(&identity).map_err(|e| e.to_string())?;
        *specs[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(ECDSACertSpec::workload(
            identity.to_string(),
            "bench-node1",
            Some(csr),
        ));
        Ok(())
    })
    .map_err(setup("making CSRs"))?;
    let specs: Vec<ECDSACertSpec> = specs
        .into_iter()
        .map(|s| s.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect::<Option<_>>()
        .ok_or_else(|| setup("making CSRs")("a CSR is missing".into()))?;

    let issue_seconds = timed_on_all_cores(count, |i| {
        // The pod lookup is an API read, measured by the pod → certificate
        // run below; this is the CPU-bound part.
        match issuer.decide(&specs[i], None, SystemTime::now(), Placement::OnNode) {
            Decision::Write { status, .. } if status.serial.is_some() => Ok(()),
            other => Err(format!("CSR {i} was not issued: {other:?}")),
        }
    })
    .map_err(|e| IdentityBenchError::Incomplete(format!("signing: {e}")))?;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| setup("a P-256 key")(e.to_string()))?;
    let message = [7u8; 32];
    let bare_seconds = timed_on_all_cores(count, |_| {
        rcgen::SigningKey::sign(&key, &message)
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .map_err(|e| IdentityBenchError::Incomplete(format!("bare signatures: {e}")))?;

    let issued_per_s = count as f64 / issue_seconds;
    Ok(SigningResults {
        threads: threads(),
        signatures: count,
        issued_per_s,
        bare_signatures_per_s: count as f64 / bare_seconds,
        goal_per_s: GOAL_SIGNATURES_PER_S,
        goal_met: issued_per_s >= GOAL_SIGNATURES_PER_S,
    })
}

/// A started API server, CRD and controller, for both scenarios.
struct Cluster {
    kube: veil_kubebed::KubeApi,
    client: Client,
    root_pem: String,
    controller_pid: u32,
    controller_log: PathBuf,
    _controller: veil_testbed::process::ChildGuard,
    _dir: tempfile::TempDir,
}

async fn start_cluster() -> Result<Cluster, IdentityBenchError> {
    let binaries = veil_kubebed::KubeBinaries::locate().map_err(|e| {
        setup("kube-apiserver and etcd")(format!("{e} (`cargo xtask kube-binaries` builds them)"))
    })?;
    eprintln!("starting kube-apiserver and etcd ...");
    let kube = veil_kubebed::KubeApi::start(&binaries)
        .await
        .map_err(|e| setup("kube-apiserver")(e.to_string()))?;
    let client = kube
        .client()
        .await
        .map_err(|e| setup("a client")(e.to_string()))?;
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/ecdsacert.yaml");
    veil_kubebed::objects::install_crd(&client, &crd, "veil-bench", Duration::from_secs(60)).await;
    create_namespace(&client, "veil-system").await?;

    let dir = tempfile::tempdir()?;
    let (cert, key) = CertificateAuthority::new_root_pem(TRUST_DOMAIN)
        .map_err(|e| setup("the mesh CA")(e.to_string()))?;
    let cert_path = dir.path().join("ca.crt");
    let key_path = dir.path().join("ca.key");
    std::fs::write(&cert_path, &cert)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)?;
        std::io::Write::write_all(&mut file, key.as_bytes())?;
    }
    let binary = veil_testbed::binaries::locate("veil-controller")
        .map_err(|e| setup("veil-controller")(e.to_string()))?;
    let log = dir.path().join("controller.log");
    let mut command = std::process::Command::new(binary);
    command
        .args(["run", "--holder", "bench"])
        .arg("--ca-cert")
        .arg(&cert_path)
        .arg("--ca-key")
        .arg(&key_path)
        .env("KUBECONFIG", kube.kubeconfig_path())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.path().join("controller.err"))?);
    let controller = veil_testbed::process::ChildGuard::spawn("veil-controller", command)
        .map_err(|e| setup("veil-controller")(e.to_string()))?;
    Ok(Cluster {
        kube,
        client,
        root_pem: cert,
        controller_pid: controller.pid(),
        controller_log: log,
        _controller: controller,
        _dir: dir,
    })
}

async fn create_namespace(client: &Client, name: &str) -> Result<(), IdentityBenchError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
        .map_err(|e| setup("a namespace")(e.to_string()))?;
    namespaces.create(&PostParams::default(), &object).await?;
    Ok(())
}

async fn pods_to_ready(
    options: &IdentityOptions,
) -> Result<Vec<ScenarioResults>, IdentityBenchError> {
    let cluster = start_cluster().await?;
    let mut scenarios = Vec::new();
    for (name, rate) in [("paced", options.rate), ("burst", 0)] {
        eprintln!(
            "{name}: {} pods on {} nodes{} ...",
            options.pods,
            options.nodes,
            if rate > 0 {
                format!(" at {rate}/s")
            } else {
                ", all at once".into()
            }
        );
        let result = scenario(&cluster, options, name, rate).await;
        match result {
            Ok(result) => {
                eprintln!(
                    "  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {:.0} certificates/s",
                    result.p50_ms, result.p99_ms, result.max_ms, result.certificates_per_s
                );
                scenarios.push(result);
            }
            Err(error) => {
                return Err(IdentityBenchError::Incomplete(format!(
                    "{error}\ncontroller log (tail):\n{}\napiserver log (tail):\n{}",
                    veil_kubebed::log_tail(&cluster.controller_log),
                    cluster.kube.apiserver_log_tail()
                )));
            }
        }
    }
    Ok(scenarios)
}

/// Processes whose name (`/proc/<pid>/comm`) is `name`.
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .collect()
}

/// When each pod's create started, by identity (one pod per identity).
type Created = Arc<Mutex<HashMap<String, Instant>>>;

async fn scenario(
    cluster: &Cluster,
    options: &IdentityOptions,
    namespace: &str,
    rate: u32,
) -> Result<ScenarioResults, IdentityBenchError> {
    let client = &cluster.client;
    create_namespace(client, namespace).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..options.pods)
        .map(|i| {
            let accounts = accounts.clone();
            async move {
                let object: ServiceAccount = serde_json::from_value(
                    serde_json::json!({"metadata": {"name": format!("sa-{i:05}")}}),
                )
                .map_err(|e| setup("a service account")(e.to_string()))?;
                accounts.create(&PostParams::default(), &object).await?;
                Ok::<_, IdentityBenchError>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;

    // The simulated nodes: a pod watch each, feeding an issuing thread.
    let created: Created = Arc::default();
    let (ready_tx, ready_rx) = mpsc::channel::<(String, Result<Instant, String>)>();
    let mut watches = Vec::new();
    let mut issuers = Vec::new();
    for node in 1..=options.nodes {
        let node_name = format!("{namespace}-node{node}");
        let (pods_tx, pods_rx) = mpsc::channel::<SpiffeId>();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        watches.push(tokio::spawn(async move {
            let mut events =
                std::pin::pin!(watcher(pods, config).default_backoff().applied_objects());
            while let Some(Ok(pod)) = events.next().await {
                if !matches!(
                    veil_crd::pods::mtls(&pod),
                    Ok(veil_crd::pods::PodMtls::Inherit)
                ) {
                    continue;
                }
                let Ok(identity) = SpiffeId::new(
                    TRUST_DOMAIN,
                    veil_crd::pods::namespace(&pod),
                    veil_crd::pods::service_account(&pod),
                ) else {
                    continue;
                };
                if pods_tx.send(identity).is_err() {
                    break;
                }
            }
        }));
        let (config, root, ready) = (
            cluster.kube.config(),
            cluster.root_pem.clone(),
            ready_tx.clone(),
        );
        issuers.push(std::thread::spawn(move || {
            node_issuer(config, &node_name, root, &pods_rx, &ready)
        }));
    }
    drop(ready_tx);

    // Create the pods: paced on a schedule, or all at once (64 in flight).
    let before = cpu::MachineCpu::now();
    let processes = [
        vec![cluster.controller_pid],
        pids_named("kube-apiserver"),
        pids_named("etcd"),
        vec![std::process::id()],
    ];
    let cpu_of = |pids: &[u32]| pids.iter().map(|&pid| cpu::process_cpu_s(pid)).sum::<f64>();
    let cpu_before: Vec<f64> = processes.iter().map(|p| cpu_of(p)).collect();
    let started = Instant::now();
    let make_pod = |i: usize| {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let created = Arc::clone(&created);
        let node = format!("{namespace}-node{}", i % options.nodes + 1);
        let identity = format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/sa-{i:05}");
        async move {
            let object: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("pod-{i:05}"), "annotations": {"veil.dev/mtls": "enabled"}},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": format!("sa-{i:05}"),
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
                }
            }))
            .map_err(|e| setup("a pod")(e.to_string()))?;
            created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(identity, Instant::now());
            pods.create(&PostParams::default(), &object).await?;
            Ok::<_, IdentityBenchError>(())
        }
    };
    if rate > 0 {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        let mut creating = Vec::new();
        for i in 0..options.pods {
            ticker.tick().await;
            creating.push(tokio::spawn(make_pod(i)));
        }
        for task in creating {
            task.await
                .map_err(|e| setup("creating pods")(e.to_string()))??;
        }
    } else {
        futures::stream::iter(0..options.pods)
            .map(make_pod)
            .buffer_unordered(64)
            .try_collect::<Vec<()>>()
            .await?;
    }
    let created_in = started.elapsed();

    // Wait for every certificate (off the async workers).
    let wanted = options.pods;
    let collected = tokio::task::spawn_blocking(move || {
        let mut ready = HashMap::new();
        let deadline = Instant::now() + SCENARIO_LIMIT;
        while ready.len() < wanted {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok((identity, Ok(at))) => {
                    ready.entry(identity).or_insert(at);
                }
                Ok((identity, Err(error))) => {
                    return Err(format!("{identity}: {error}"));
                }
                Err(_) => {
                    return Err(format!(
                        "{} of {wanted} certificates ready within {SCENARIO_LIMIT:?}",
                        ready.len()
                    ));
                }
            }
        }
        Ok(ready)
    })
    .await
    .map_err(|e| setup("collecting")(e.to_string()))?
    .map_err(IdentityBenchError::Incomplete)?;
    let duration = started.elapsed();
    let percent: Vec<f64> = processes
        .iter()
        .zip(&cpu_before)
        .map(|(pids, before)| 100.0 * (cpu_of(pids) - before) / duration.as_secs_f64())
        .collect();
    let busy = match (before, cpu::MachineCpu::now()) {
        (Some(before), Some(after)) => {
            100.0 * after.since(&before).busy_s / (duration.as_secs_f64() * threads() as f64)
        }
        _ => f64::NAN,
    };
    for watch in watches {
        watch.abort();
    }
    // The issuers end when their watch (the sender) is gone.
    for issuer in issuers {
        let _ = issuer.join();
    }

    let created = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut histogram = Histogram::<u64>::new(3).map_err(|e| setup("histogram")(e.to_string()))?;
    for (identity, ready_at) in &collected {
        let Some(created_at) = created.get(identity) else {
            return Err(IdentityBenchError::Incomplete(format!(
                "{identity} is ready but was never created"
            )));
        };
        let micros = ready_at.saturating_duration_since(*created_at).as_micros();
        histogram
            .record(u64::try_from(micros).unwrap_or(u64::MAX).max(1))
            .map_err(|e| setup("histogram")(e.to_string()))?;
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let p99_ms = ms(0.99);
    Ok(ScenarioResults {
        name: namespace.into(),
        pods: options.pods,
        nodes: options.nodes,
        rate_wanted: rate,
        rate_achieved: options.pods as f64 / created_in.as_secs_f64(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms,
        max_ms: histogram.max() as f64 / 1000.0,
        duration_s: duration.as_secs_f64(),
        certificates_per_s: options.pods as f64 / duration.as_secs_f64(),
        controller_cpu_percent: percent[0],
        apiserver_cpu_percent: percent[1],
        etcd_cpu_percent: percent[2],
        nodes_cpu_percent: percent[3],
        machine_busy_percent: busy,
        goal_p99_ms: GOAL_P99.as_secs_f64() * 1000.0,
        goal_met: p99_ms <= GOAL_P99.as_secs_f64() * 1000.0,
    })
}

/// One simulated node's issuing thread: each batch of new pods' identities
/// is issued as the agent's certificate keeper issues them.
fn node_issuer(
    config: kube::Config,
    node: &str,
    root: String,
    pods: &mpsc::Receiver<SpiffeId>,
    ready: &mpsc::Sender<(String, Result<Instant, String>)>,
) {
    let signer = match KubernetesSigner::from_config(config, node, SCENARIO_LIMIT) {
        Ok(signer) => signer,
        Err(error) => {
            let _ = ready.send((node.to_string(), Err(error)));
            return;
        }
    };
    let store = WorkloadStore::with_signer(
        Box::new(signer),
        TRUST_DOMAIN.into(),
        vec![root],
        veil_mtls::TlsSettings::default(),
    );
    while let Ok(first) = pods.recv() {
        let mut batch = vec![first];
        batch.extend(pods.try_iter());
        store.ensure_all_with(&batch, ISSUE_PARALLELISM, |identity, result| {
            let outcome = result.map(|_| Instant::now()).map_err(|e| e.to_string());
            let _ = ready.send((identity.to_string(), outcome));
        });
    }
}

/// The Markdown report of a run.
pub fn markdown(results: &IdentityResults) -> String {
    let signing = &results.signing;
    let mut out = format!(
        "# Workload identity issuance, {}\n\nMachine: {}\n\n## Signing (CSR → signed)\n\n\
         The controller's issue path (`LocalIssuer::decide`: CSR parsed and its signature \
         checked, identity and lifetime validated, leaf signed, status built) over {} CSRs on \
         {} threads, beside bare ECDSA P-256 signatures on the same threads.\n\n\
         | | per second | ratio |\n|---|---|---|\n\
         | controller issue path | {:.0} | {:.2}× bare |\n| bare ECDSA P-256 signature | {:.0} | 1.00× |\n\n\
         Goal ≥ {:.0} signatures/s on this machine: **{}**.\n\n\
         ## Pod scheduled → certificate ready\n\n\
         A real kube-apiserver and etcd, the `veil-controller` binary, and simulated nodes running \
         the agent's issuance code (pod watch on the node, `WorkloadStore` + `KubernetesSigner`: \
         key on the node, CSR in an `ECDSACert`, the chain picked up by the node's one watch on \
         its `ECDSACert`s; 32 issues at once per node) without the datapath. One service account per pod: one certificate per \
         pod. Latency = the pod's create call → its certificate in the node's store. Everything \
         shares this machine's cores.\n\n\
         | scenario | pods | nodes | created at | p50 | p90 | p99 | max | certificates/s | CPU: controller / API server / etcd / nodes (% of a core) | machine busy |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        results.started,
        results.machine,
        signing.signatures,
        signing.threads,
        signing.issued_per_s,
        signing.issued_per_s / signing.bare_signatures_per_s,
        signing.bare_signatures_per_s,
        signing.goal_per_s,
        if signing.goal_met { "met" } else { "not met" }
    );
    for scenario in &results.scenarios {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} | {:.0} / {:.0} / {:.0} / {:.0} | {:.0} % |\n",
            scenario.name,
            scenario.pods,
            scenario.nodes,
            if scenario.rate_wanted > 0 {
                format!("{}/s (achieved {:.0}/s)", scenario.rate_wanted, scenario.rate_achieved)
            } else {
                format!("burst ({:.0}/s)", scenario.rate_achieved)
            },
            scenario.p50_ms,
            scenario.p90_ms,
            scenario.p99_ms,
            scenario.max_ms,
            scenario.certificates_per_s,
            scenario.controller_cpu_percent,
            scenario.apiserver_cpu_percent,
            scenario.etcd_cpu_percent,
            scenario.nodes_cpu_percent,
            scenario.machine_busy_percent,
        ));
    }
    out.push('\n');
    for scenario in &results.scenarios {
        out.push_str(&format!(
            "Goal p99 ≤ {:.0} ms, {}: **{}**.\n",
            scenario.goal_p99_ms,
            scenario.name,
            if scenario.goal_met { "met" } else { "not met" }
        ));
    }
    out
}

fn write(dir: &Path, results: &IdentityResults) -> Result<PathBuf, IdentityBenchError> {
    Ok(crate::output::write_report(
        dir,
        &results.started,
        "identity",
        results,
        &markdown(results),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_part_issues_every_csr_and_reports_rates() {
        let results = signing(20).unwrap();
        assert_eq!(results.signatures, 20);
        assert!(results.issued_per_s > 0.0 && results.bare_signatures_per_s > 0.0);
        assert!(
            results.bare_signatures_per_s > results.issued_per_s,
            "the issue path does more than one signature: {results:?}"
        );
    }

    #[test]
    fn the_report_names_goals_and_scenarios() {
        let results = IdentityResults {
            started: "2026-11-23T04:00:00Z".into(),
            machine: "test".into(),
            signing: SigningResults {
                threads: 2,
                signatures: 100,
                issued_per_s: 3000.0,
                bare_signatures_per_s: 30000.0,
                goal_per_s: GOAL_SIGNATURES_PER_S,
                goal_met: true,
            },
            scenarios: vec![ScenarioResults {
                name: "paced".into(),
                pods: 1000,
                nodes: 10,
                rate_wanted: 100,
                rate_achieved: 99.0,
                p50_ms: 80.0,
                p90_ms: 150.0,
                p99_ms: 1200.0,
                max_ms: 1500.0,
                duration_s: 11.0,
                certificates_per_s: 90.0,
                controller_cpu_percent: 30.0,
                apiserver_cpu_percent: 90.0,
                etcd_cpu_percent: 20.0,
                nodes_cpu_percent: 40.0,
                machine_busy_percent: 80.0,
                goal_p99_ms: 1000.0,
                goal_met: false,
            }],
        };
        let report = markdown(&results);
        assert!(
            report.contains("| controller issue path | 3000 | 0.10× bare |"),
            "{report}"
        );
        assert!(report.contains("100/s (achieved 99/s)"), "{report}");
        assert!(
            report.contains("Goal p99 ≤ 1000 ms, paced: **not met**"),
            "{report}"
        );
    }
}
