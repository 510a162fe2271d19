//! A real Kubernetes API server for tests: etcd and kube-apiserver on
//! loopback, started per test and gone when the test ends.
//!
//! [`KubeApi::start`] makes a temporary directory with a fresh PKI (CA,
//! serving certificate for 127.0.0.1/localhost, an admin client certificate
//! in group `system:masters`, a service-account signing key), starts etcd on
//! two free loopback ports and kube-apiserver on a third, with RBAC
//! authorization and the default admission plugins, waits (bounded) until
//! `/readyz` answers `ok`, and writes a kubeconfig for kubectl-like use.
//! Dropping the [`KubeApi`] stops both process groups and removes the
//! directory, also when the test panics.
//!
//! The binaries come from `cargo xtask kube-binaries` (see
//! [`KubeBinaries::locate`]); tests use [`start_for_test`], which follows the
//! workspace's rule for missing prerequisites: the test is
//! `#[ignore = "needs kube-apiserver and etcd: cargo xtask test runs it"]`,
//! and when it runs without them it fails (a panic saying how to build them),
//! never passes.
//!
//! ```no_run
//! # async fn example() {
//! let api = veil_kubebed::start_for_test("my test").await;
//! let client = api.client().await.unwrap();
//! let agent = api.client_as_service_account("veil-system", "veil-agent").await.unwrap();
//! # }
//! ```

mod binaries;
mod certs;
pub mod objects;
mod process;

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use binaries::{BUILD_COMMAND, KubeBinaries, require_kube_binaries};
pub use certs::ADMIN_USER;
use process::GroupChild;
pub use process::log_tail;

/// How long etcd and then kube-apiserver each get to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The service IP range the API server allocates from (its first address,
/// 10.96.0.1, is in the serving certificate).
const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

/// Why a test API server could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum KubeBedError {
    #[error(
        "kube-apiserver or etcd is not built (missing: {missing}): run `{BUILD_COMMAND}` \
         (builds both from Go modules into $VEIL_CACHE_DIR/kube, VEIL_CACHE_DIR defaulting to \
         /var/cache/veil; 10-40 minutes the first time, seconds afterwards), or point \
         VEIL_KUBE_APISERVER and VEIL_ETCD at existing binaries"
    )]
    BinariesMissing { missing: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the test PKI: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; {log_tail}")]
    Exited {
        name: &'static str,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("{name} was not ready after {waited:.0?} (last answer: {last}); {log_tail}")]
    NotReady {
        name: &'static str,
        waited: Duration,
        last: String,
        log_tail: String,
    },
    #[error("cannot load the generated kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the API server issued no token for the pod {0}")]
    TokenMissing(String),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

pub type Result<T, E = KubeBedError> = std::result::Result<T, E>;

/// A running etcd + kube-apiserver pair; stopped and cleaned up on drop.
pub struct KubeApi {
    // Field order is drop order: the API server stops before etcd, and the
    // directory (data, certificates, logs) goes last.
    apiserver: GroupChild,
    etcd: GroupChild,
    url: String,
    kubeconfig: PathBuf,
    config: Config,
    pki: certs::Pki,
    dir: tempfile::TempDir,
}

/// Starts a [`KubeApi`] for the test `what`. Panics (failing the test)
/// when the binaries are not built, saying how to build them, and, with the
/// servers' last log lines, when they are built but do not come up.
pub async fn start_for_test(what: &str) -> KubeApi {
    let binaries = require_kube_binaries(what);
    match KubeApi::start(&binaries).await {
        Ok(api) => api,
        Err(error) => panic!("{what}: cannot start the test API server: {error}"),
    }
}

impl KubeApi {
    /// Starts etcd and kube-apiserver and waits until the API server is ready.
    ///
    /// Call it from the thread that keeps the returned value (any async
    /// test's own runtime does): the children get SIGKILL if that thread's
    /// process dies without dropping it.
    pub async fn start(binaries: &KubeBinaries) -> Result<Self> {
        install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("veil-kubebed-")
            .tempdir()
            .map_err(|source| KubeBedError::Io {
                what: "cannot create a temporary directory".into(),
                source,
            })?;
        let pki = certs::write_pki(dir.path())?;
        let [etcd_client, etcd_peer, apiserver_port] = free_loopback_ports()?;

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd_command = Command::new(&binaries.etcd);
        etcd_command
            .arg("--name=veil-kubebed")
            .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=veil-kubebed={peer_url}"))
            .arg("--initial-cluster-state=new")
            // A throwaway data directory: durability buys nothing here.
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        let mut etcd = GroupChild::spawn("etcd", etcd_command, &dir.path().join("etcd.log"))?;
        wait_for_etcd(&mut etcd, etcd_client).await?;

        let url = format!("https://127.0.0.1:{apiserver_port}");
        let mut apiserver_command = Command::new(&binaries.kube_apiserver);
        apiserver_command
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={apiserver_port}"))
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.serving_key.display()
            ))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg(format!(
                "--service-account-key-file={}",
                pki.service_account_public_key.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--shutdown-delay-duration=0s")
            // The `kubernetes` Service's endpoints cannot be a loopback
            // address, and nothing here routes to them anyway.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!(
                "--cert-dir={}",
                dir.path().join("apiserver-certs").display()
            ));
        let apiserver = GroupChild::spawn(
            "kube-apiserver",
            apiserver_command,
            &dir.path().join("kube-apiserver.log"),
        )?;

        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &url,
            None,
            KubeconfigUser::Admin { impersonate: None },
            &pki,
        )?;
        let config = load_kubeconfig(&kubeconfig).await?;
        let mut api = Self {
            apiserver,
            etcd,
            url,
            kubeconfig,
            config,
            pki,
            dir,
        };
        api.wait_until_ready().await?;
        Ok(api)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig (admin, `system:masters`) for kubectl-like tools; it
    /// lives as long as this value.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig at `path` for reaching this API server at
    /// `server` (e.g. a relay's `https://198.18.0.1:6443` inside a test
    /// bed's namespace), acting as the ServiceAccount `namespace/name` so
    /// RBAC decides as for it. The serving certificate is checked as
    /// `localhost` (`tls-server-name`), whatever address `server` names.
    pub fn write_service_account_kubeconfig(
        &self,
        path: &Path,
        server: &str,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        write_kubeconfig(
            path,
            server,
            Some("localhost"),
            KubeconfigUser::Admin {
                impersonate: Some((namespace, name)),
            },
            &self.pki,
        )
    }

    /// The temporary directory holding certificates, etcd's data and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin client configuration (cluster-admin through `system:masters`).
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// A client authenticated as the admin user.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config())?)
    }

    /// A client that impersonates `user` in `groups`, so RBAC decides as
    /// for that user (the admin may impersonate anyone).
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let mut config = self.config();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|group| (*group).to_owned()).collect());
        Ok(Client::try_from(config)?)
    }

    /// A client acting as the ServiceAccount `namespace/name`, with the
    /// groups the API server gives a ServiceAccount token.
    pub async fn client_as_service_account(&self, namespace: &str, name: &str) -> Result<Client> {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let namespace_group = format!("system:serviceaccounts:{namespace}");
        self.client_as(
            &user,
            &[
                "system:serviceaccounts",
                &namespace_group,
                "system:authenticated",
            ],
        )
        .await
    }

    /// A client holding a ServiceAccount token bound to the pod
    /// `namespace/pod`, as the kubelet projects one into it: the API server
    /// authenticates it as the pod's service account and, the pod being
    /// scheduled, names its node in the user's extra
    /// `authentication.kubernetes.io/node-name` (what admission policies
    /// bind node agents with). The pod must exist; no kubelet needs to run.
    pub async fn client_as_pod(&self, namespace: &str, pod: &str) -> Result<Client> {
        Ok(Client::try_from(self.config_as_pod(namespace, pod).await?)?)
    }

    /// The client configuration of [`Self::client_as_pod`], for code that
    /// makes its own clients (the agent's signer).
    pub async fn config_as_pod(&self, namespace: &str, pod: &str) -> Result<Config> {
        let token = self.pod_token(namespace, pod).await?;
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-pod-{namespace}-{pod}"));
        write_kubeconfig(
            &path,
            &self.url,
            None,
            KubeconfigUser::Token(&token),
            &self.pki,
        )?;
        load_kubeconfig(&path).await
    }

    /// Writes a kubeconfig at `path` with a token bound to the pod
    /// `namespace/pod` (see [`Self::client_as_pod`]) for reaching this API
    /// server at `server` (e.g. a relay inside a test bed's namespace); the
    /// serving certificate is checked as `localhost`.
    pub async fn write_pod_kubeconfig(
        &self,
        path: &Path,
        server: &str,
        namespace: &str,
        pod: &str,
    ) -> Result<()> {
        let token = self.pod_token(namespace, pod).await?;
        write_kubeconfig(
            path,
            server,
            Some("localhost"),
            KubeconfigUser::Token(&token),
            &self.pki,
        )
    }

    /// A service account token bound to the pod `namespace/pod` (an hour).
    async fn pod_token(&self, namespace: &str, pod: &str) -> Result<String> {
        use k8s_openapi::api::{
            authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
            core::v1::{Pod, ServiceAccount},
        };
        use kube::{Api, api::PostParams};

        let admin = self.client().await?;
        let bound = Api::<Pod>::namespaced(admin.clone(), namespace)
            .get(pod)
            .await?;
        let account = bound
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.to_owned()),
                    uid: bound.metadata.uid.clone(),
                }),
                expiration_seconds: Some(3600),
            },
            ..TokenRequest::default()
        };
        let answer = Api::<ServiceAccount>::namespaced(admin, namespace)
            .create_token_request(&account, &PostParams::default(), &request)
            .await?;
        answer
            .status
            .map(|status| status.token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| KubeBedError::TokenMissing(format!("{namespace}/{pod}")))
    }

    /// The last lines of kube-apiserver's log (for assertion messages).
    pub fn apiserver_log_tail(&self) -> String {
        self.apiserver.log_tail()
    }

    /// Polls `/readyz` until it answers `ok` (RBAC's bootstrap roles and the
    /// CRD machinery are then in place), for at most [`READY_TIMEOUT`].
    async fn wait_until_ready(&mut self) -> Result<()> {
        let client = Client::try_from(self.config())?;
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < READY_TIMEOUT {
            if let Some(status) = self.apiserver.exit_status() {
                return Err(self.apiserver.exited_error(status));
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request is valid");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(KubeBedError::NotReady {
            name: "kube-apiserver",
            waited: started.elapsed(),
            last,
            log_tail: self.apiserver.log_tail(),
        })
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The directory with the logs is about to go: keep the evidence.
            eprintln!(
                "veil-kubebed: the test panicked; kube-apiserver's log: {}",
                self.apiserver.log_tail()
            );
        }
        self.apiserver.stop();
        self.etcd.stop();
    }
}

/// kube-rs builds its TLS config from rustls's process-wide provider; pick
/// ring explicitly so a second provider elsewhere in the build cannot make
/// that ambiguous.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Three distinct free TCP ports on 127.0.0.1 (held together while picked).
fn free_loopback_ports() -> Result<[u16; 3]> {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| KubeBedError::Io {
            what: "cannot bind a free loopback port".into(),
            source,
        })
    };
    let listeners = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|source| KubeBedError::Io {
                what: "cannot read a bound port".into(),
                source,
            })?
            .port();
    }
    Ok(ports)
}

/// Polls etcd's `/health` until it reports `"health":"true"`.
async fn wait_for_etcd(etcd: &mut GroupChild, port: u16) -> Result<()> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < READY_TIMEOUT {
        if let Some(status) = etcd.exit_status() {
            return Err(etcd.exited_error(status));
        }
        match http_get_loopback(port, "/health").await {
            Ok(body) if body.contains("\"health\":\"true\"") => return Ok(()),
            Ok(body) => last = body,
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(KubeBedError::NotReady {
        name: "etcd",
        waited: started.elapsed(),
        last,
        log_tail: etcd.log_tail(),
    })
}

/// A plain HTTP/1.0 GET to 127.0.0.1:`port`; the whole response as text.
async fn http_get_loopback(port: u16, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))?
}

/// Who a kubeconfig written here authenticates as.
enum KubeconfigUser<'a> {
    /// The admin's client certificate files (`system:masters`), impersonating
    /// the ServiceAccount `namespace/name` when given.
    Admin {
        impersonate: Option<(&'a str, &'a str)>,
    },
    /// A bearer token.
    Token(&'a str),
}

/// A kubeconfig for `url` (usable by kubectl as well), checking the serving
/// certificate as `server_name` when given (for servers reached through a
/// relay). Written 0600: it may hold a token.
fn write_kubeconfig(
    path: &Path,
    url: &str,
    server_name: Option<&str>,
    user: KubeconfigUser<'_>,
    pki: &certs::Pki,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let server_name = server_name
        .map(|name| format!("    tls-server-name: {name}\n"))
        .unwrap_or_default();
    let credentials = match user {
        KubeconfigUser::Admin { impersonate } => {
            let impersonation = impersonate
                .map(|(namespace, name)| {
                    format!(
                        "    as: system:serviceaccount:{namespace}:{name}\n    as-groups:\n\
                         \x20   - system:serviceaccounts\n\x20   - system:serviceaccounts:{namespace}\n\
                         \x20   - system:authenticated\n"
                    )
                })
                .unwrap_or_default();
            format!(
                "    client-certificate: {cert}\n    client-key: {key}\n{impersonation}",
                cert = pki.admin_cert.display(),
                key = pki.admin_key.display(),
            )
        }
        KubeconfigUser::Token(token) => format!("    token: {token}\n"),
    };
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: veil-kubebed\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n{server_name}\
         users:\n\
         - name: {ADMIN_USER}\n  user:\n{credentials}\
         contexts:\n\
         - name: veil-kubebed\n  context:\n    cluster: veil-kubebed\n    user: {ADMIN_USER}\n    namespace: default\n\
         current-context: veil-kubebed\n",
        ca = pki.ca_cert.display(),
    );
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|source| KubeBedError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })
}

async fn load_kubeconfig(path: &Path) -> Result<Config> {
    let kubeconfig_error = |source| KubeBedError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    Ok(config)
}
