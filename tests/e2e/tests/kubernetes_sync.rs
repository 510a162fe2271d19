//! Agents fed by a real kube-apiserver: no inventory file, only `[kubernetes]`.
//!
//! The API server (etcd + kube-apiserver from `cargo xtask kube-binaries`)
//! runs on the host's loopback; a relay in node 1's namespace on the underlay
//! (198.18.0.1:6443) lets every node's agent reach it, each with a token
//! bound to its own DaemonSet pod object, as the `veil-agent` ServiceAccount
//! under the RBAC and admission policy of `deploy/kubernetes`. There
//! is no kubelet: the test creates Node and Pod objects and writes pod
//! status (the address) as a kubelet would, against the test bed's real pods.
//!
//! - Nodes: each agent writes its underlay address and MAC into its Node;
//!   each agent routes the other node's pod CIDR from the Node objects.
//! - Pods: a pod given an address on a node reaches that node's maps (veth
//!   and MAC found in the kernel) within a second, carries traffic across
//!   nodes, and is gone within a second of its deletion; a misspelt
//!   `veil.dev/mtls` leaves the pod out, with the reason in `veilctl status`.
//! - With `veil-controller` publishing pod lifecycle on Kafka (a real tansu
//!   broker), a pod moved to another node is routed there by the node that
//!   does not watch it: the API and the bus converge on one state. Both pods
//!   are meshed, so their TCP crosses in mTLS, and the connection shows up as
//!   a flow record on `veil.flows`.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use veil_events::{
    bus::{EventBus, EventConsumer},
    kafka::{KafkaBus, KafkaSettings},
    schema::{Event, Topic},
};
use veil_testbed::{
    Agent, PodRef, Routing, Topology, TopologySpec, inventory::link_mac, kafka::Broker,
    relay::TcpRelay, require_root, wait_for,
};

const VNI: u32 = 8181;
const NAMESPACE: &str = "shop";
/// Where the relay to the API server listens, inside node 1's namespace.
const API_ADDRESS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 6443);
const BROKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const FIELD_MANAGER: &str = "veil-e2e";
/// One API server at a time: each needs a few hundred MB and a core while it starts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("tests/e2e is two levels below the repository root")
}

/// The namespace, service accounts, RBAC and admission policy of
/// `deploy/kubernetes`, and the namespace and service accounts the test's
/// pods use.
async fn install_cluster_objects(client: &Client) {
    for file in [
        "00-namespace.yaml",
        "10-serviceaccounts.yaml",
        "20-rbac-agent.yaml",
        "21-rbac-controller.yaml",
        "22-admission-agent.yaml",
    ] {
        let text = std::fs::read_to_string(repo_root().join("deploy/kubernetes").join(file))
            .unwrap()
            .replace("{{namespace}}", "veil-system");
        for object in veil_kubebed::objects::documents(&text) {
            veil_kubebed::objects::apply(client, &object, FIELD_MANAGER, false)
                .await
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    veil_kubebed::objects::install_crd(
        client,
        &repo_root().join("deploy/crds/mtlspolicy.yaml"),
        FIELD_MANAGER,
        Duration::from_secs(30),
    )
    .await;
    let objects = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: {NAMESPACE}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: web, namespace: {NAMESPACE}}}\n"
    );
    for object in veil_kubebed::objects::documents(&objects) {
        veil_kubebed::objects::apply(client, &object, FIELD_MANAGER, false)
            .await
            .unwrap();
    }
}

/// A Node object as a kubelet would register it (no Veil annotations yet).
async fn register_node(client: &Client, node: usize) {
    let nodes: Api<Node> = Api::all(client.clone());
    let object: Node = serde_json::from_value(json!({
        "metadata": {"name": format!("node{node}")},
        "spec": {"podCIDR": veil_testbed::addressing::node_pod_cidr(node)},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &object).await.unwrap();
    let status = json!({"status": {"addresses": [
        {"type": "InternalIP", "address": veil_testbed::addressing::node_underlay_ip(node).to_string()}
    ]}});
    nodes
        .patch_status(
            &format!("node{node}"),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
}

/// Creates pod `name` on `node` (scheduled), then gives it `ip` as its
/// kubelet would once the sandbox runs; returns when the status is written.
async fn run_pod(client: &Client, name: &str, node: usize, ip: Ipv4Addr, mtls: Option<&str>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let annotations = match mtls {
        Some(mode) => json!({"veil.dev/mtls": mode}),
        None => json!({}),
    };
    let object: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": format!("node{node}"),
            "serviceAccountName": "web",
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &object).await.unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                                   "podIPs": [{"ip": ip.to_string()}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn delete_pod(client: &Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

/// The MAC agent `agent` has for local endpoint `ip`, if any.
fn endpoint_mac(agent: &Agent, ip: Ipv4Addr) -> Option<String> {
    agent
        .status()
        .ok()?
        .overlay?
        .endpoints
        .into_iter()
        .find(|e| e.ip == ip.to_string())
        .map(|e| e.pod_mac)
}

/// The underlay address agent `agent` routes `cidr` to, if any.
fn route(agent: &Agent, cidr: &str) -> Option<String> {
    agent
        .status()
        .ok()?
        .overlay?
        .routes
        .into_iter()
        .find(|r| r.cidr == cidr)
        .map(|r| r.node_ip)
}

/// The relay to the API server and one kubeconfig per node for its agent.
struct ApiAccess {
    _relay: TcpRelay,
    kubeconfigs: Vec<PathBuf>,
}

/// The relay, and per node the agent DaemonSet's pod (an object only: the
/// agent runs as a test process) and a kubeconfig with a token bound to it,
/// as the kubelet would project it: the agent authenticates as `veil-agent`
/// on its node, so the admission policy binds it to that node. The nodes
/// must be registered.
async fn agent_access(
    kube: &veil_kubebed::KubeApi,
    client: &Client,
    topology: &Topology,
) -> ApiAccess {
    let port: u16 = kube
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API server URL ends in its port");
    let relay = TcpRelay::start(
        &topology.node(1),
        API_ADDRESS,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    )
    .unwrap();
    let mut kubeconfigs = Vec::new();
    for node in 1..=topology.spec().nodes {
        let pod = veil_kubebed::objects::agent_pod("veil-system", &format!("node{node}"));
        veil_kubebed::objects::apply(client, &pod, FIELD_MANAGER, false)
            .await
            .unwrap();
        let name = pod["metadata"]["name"].as_str().unwrap();
        let path = topology
            .workdir()
            .join(format!("kubeconfig-veil-agent-n{node}"));
        kube.write_pod_kubeconfig(
            &path,
            &format!("https://{API_ADDRESS}"),
            "veil-system",
            name,
        )
        .await
        .unwrap();
        kubeconfigs.push(path);
    }
    ApiAccess {
        _relay: relay,
        kubeconfigs,
    }
}

fn kubernetes_section(kubeconfig: &Path) -> String {
    format!(
        "\n[kubernetes]\nkubeconfig = \"{}\"\n",
        kubeconfig.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces, eBPF), kube-apiserver and etcd: cargo xtask test runs it"]
async fn agents_build_the_overlay_from_nodes_and_pods_in_the_api_server() {
    require_root("Kubernetes-fed agents test");
    let _serial = ONE_AT_A_TIME.lock().await;
    let kube = veil_kubebed::start_for_test("Kubernetes-fed agents test").await;
    let client = kube.client().await.unwrap();
    install_cluster_objects(&client).await;
    let topology = Topology::build(
        TopologySpec::new("kwatch")
            .nodes(2)
            .pods_per_node(2)
            .routing(Routing::None),
    )
    .unwrap();
    for node in 1..=2 {
        register_node(&client, node).await;
    }
    let access = agent_access(&kube, &client, &topology).await;
    // The mesh too (its root on the nodes): pods annotated veil.dev/mtls
    // become workloads with the identity of their service account.
    let (ca_cert, ca_key) =
        veil_identity::CertificateAuthority::new_root_pem("cluster.local").unwrap();
    let ca = veil_testbed::MeshCaFiles::write(&topology, &ca_cert, &ca_key).unwrap();
    let agents: Vec<Agent> = (1..=2)
        .map(|node| {
            let sections = format!(
                "{}{}",
                kubernetes_section(&access.kubeconfigs[node - 1]),
                ca.agent_section("cluster.local")
            );
            Agent::start_overlay_without_inventory(&topology, node, VNI, &sections).unwrap()
        })
        .collect();

    // Each agent annotates its Node; each routes the other's pod CIDR.
    wait_for("both nodes routed", Duration::from_secs(20), || {
        route(&agents[0], "198.19.2.0/24").as_deref() == Some("198.18.0.2")
            && route(&agents[1], "198.19.1.0/24").as_deref() == Some("198.18.0.1")
    });
    let nodes: Api<Node> = Api::all(client.clone());
    let node1 = nodes.get("node1").await.unwrap();
    let annotations = node1.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations.get("veil.dev/underlay-mac"),
        Some(&link_mac(&topology.node(1), "ul0").unwrap()),
        "the agent writes its underlay MAC into its Node"
    );
    assert_eq!(
        annotations.get("veil.dev/underlay-ip").map(String::as_str),
        Some("198.18.0.1")
    );

    // A pod given its address reaches its node's maps within a second, with
    // the MAC of the pod's own interface.
    let (web1, web2) = (PodRef::new(1, 1), PodRef::new(2, 1));
    for (name, pod) in [("web-1", web1), ("web-2", web2)] {
        run_pod(&client, name, pod.node, pod.ip(), Some("permissive")).await;
        let took = wait_for(
            &format!("{name} in node {}'s maps", pod.node),
            Duration::from_secs(10),
            || endpoint_mac(&agents[pod.node - 1], pod.ip()).is_some(),
        );
        eprintln!("pod status written → {name} in its node's maps: {took:?}");
        assert!(
            took <= Duration::from_secs(1),
            "{name}: took {took:?} (goal: within 1 s)"
        );
        assert_eq!(
            endpoint_mac(&agents[pod.node - 1], pod.ip()),
            Some(link_mac(&topology.pod(pod), "eth0").unwrap()),
            "the pod's MAC comes from the kernel's neighbour table"
        );
    }
    veil_testbed::traffic::ping(&topology, web1, web2.ip(), 3).unwrap();
    let workloads = agents[0].veilctl(&["workloads"]).unwrap();
    assert!(
        workloads.contains("shop/web-1")
            && workloads.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "the annotated pod is meshed as its service account:\n{workloads}"
    );

    // `veilctl generate` writes the MTLSPolicy that makes port 8080 of the
    // web workload STRICT; applied, the agents take it from the API server.
    let generated = std::process::Command::new(veil_testbed::binaries::locate("veilctl").unwrap())
        .args([
            "generate",
            "--namespace",
            NAMESPACE,
            "--service-account",
            "web",
        ])
        .args(["--port", "8080", "--mode", "strict"])
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    let yaml = String::from_utf8(generated.stdout).unwrap();
    for object in veil_kubebed::objects::documents(&yaml) {
        veil_kubebed::objects::apply(&client, &object, FIELD_MANAGER, false)
            .await
            .unwrap_or_else(|e| panic!("the API server refuses the generated policy: {e}\n{yaml}"));
    }
    let took = wait_for("the port policy on node 1", Duration::from_secs(10), || {
        agents[0]
            .veilctl(&["mtls", "shop/web-1", "--port", "8080", "-o", "json"])
            .ok()
            .and_then(|json| serde_json::from_str::<veil_api::ModeReport>(&json).ok())
            .is_some_and(|report| {
                report.mode == "strict"
                    && report
                        .chain
                        .iter()
                        .any(|level| level.decided && level.level == "port")
            })
    });
    eprintln!("MTLSPolicy applied → effective on node 1: {took:?}");
    let other_port = agents[0]
        .veilctl(&["mtls", "shop/web-1", "--port", "9090"])
        .unwrap();
    assert!(other_port.contains("PERMISSIVE"), "{other_port}");

    // A second policy that disagrees about the same port is a conflict:
    // refused with both named (the last good state stays), until one goes.
    let conflicting = veil_kubebed::objects::documents(
        "apiVersion: veil.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: web-8080-open, namespace: shop}\n\
         spec: {serviceAccount: web, port: 8080, mode: PERMISSIVE}\n",
    );
    veil_kubebed::objects::apply(&client, &conflicting[0], FIELD_MANAGER, false)
        .await
        .unwrap();
    wait_for("the conflict found", Duration::from_secs(10), || {
        agents[0]
            .veilctl_exit(&["check"])
            .is_ok_and(|(code, report)| code == 3 && report.contains("conflicting mTLS settings"))
    });
    let policies: Api<veil_crd::MTLSPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    policies
        .delete("web-8080-open", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the conflict gone", Duration::from_secs(10), || {
        agents[0]
            .veilctl_exit(&["check"])
            .is_ok_and(|(_, report)| !report.contains("conflicting mTLS settings"))
    });

    // A misspelt mode leaves the pod out (fail closed) and says why.
    let misspelt = PodRef::new(1, 2);
    run_pod(&client, "typo", 1, misspelt.ip(), Some("stirct")).await;
    wait_for("the misspelt pod reported", Duration::from_secs(10), || {
        agents[0]
            .status()
            .ok()
            .and_then(|s| s.overlay)
            .is_some_and(|o| o.warnings.iter().any(|w| w.contains("stirct")))
    });
    assert_eq!(endpoint_mac(&agents[0], misspelt.ip()), None);

    // Deleted → gone from the maps within a second.
    delete_pod(&client, "web-2").await;
    let took = wait_for("web-2 removed", Duration::from_secs(10), || {
        endpoint_mac(&agents[1], web2.ip()).is_none()
    });
    eprintln!("pod deleted → gone from the maps: {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    assert!(
        veil_testbed::traffic::ping(&topology, web1, web2.ip(), 1).is_err(),
        "a deleted pod's address is no longer delivered"
    );
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces, eBPF), kube-apiserver, etcd and a Kafka broker (tansu): cargo xtask test runs it"]
async fn the_controller_announces_pods_on_kafka_to_the_nodes_that_do_not_watch_them() {
    require_root("controller pod events test");
    let _serial = ONE_AT_A_TIME.lock().await;
    let kube = veil_kubebed::start_for_test("controller pod events test").await;
    let client = kube.client().await.unwrap();
    install_cluster_objects(&client).await;
    veil_kubebed::objects::install_crd(
        &client,
        &repo_root().join("deploy/crds/ecdsacert.yaml"),
        FIELD_MANAGER,
        Duration::from_secs(30),
    )
    .await;
    let mut topology = Topology::build(
        TopologySpec::new("kctl")
            .nodes(2)
            .pods_per_node(2)
            .routing(Routing::None),
    )
    .unwrap();
    let broker = Broker::start_in("controller pod events test", &topology.node(1), BROKER_IP);
    for node in 1..=2 {
        register_node(&client, node).await;
    }
    let agent_access = agent_access(&kube, &client, &topology).await;
    let controller_kubeconfig = topology.workdir().join("kubeconfig-controller");
    kube.write_service_account_kubeconfig(
        &controller_kubeconfig,
        &format!("https://{API_ADDRESS}"),
        "veil-system",
        "veil-controller",
    )
    .unwrap();

    // The controller, as a process on node 1 (where the relay and broker are).
    let (ca_cert, ca_key) =
        veil_identity::CertificateAuthority::new_root_pem("cluster.local").unwrap();
    let ca = veil_testbed::MeshCaFiles::write(&topology, &ca_cert, &ca_key).unwrap();
    // n1p2 keeps its address from node 1's CIDR but now runs on node 2.
    let moved = PodRef::new(1, 2);
    topology.move_pod(moved, 2).unwrap();
    let controller_log = topology.workdir().join("controller.log");
    let start_controller = |log: &Path| {
        let mut command = topology
            .node(1)
            .command(veil_testbed::binaries::locate("veil-controller").unwrap());
        command
            .args(["run", "--holder", "test-controller"])
            .arg("--ca-cert")
            .arg(&ca.cert)
            .arg("--ca-key")
            .arg(&ca.key)
            .arg("--kafka-brokers")
            .arg(broker.address())
            .arg("--events-state-dir")
            .arg(topology.workdir().join("controller-events"))
            .env("KUBECONFIG", &controller_kubeconfig)
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
        veil_testbed::process::ChildGuard::spawn("veil-controller", command).unwrap()
    };
    let mut controller = start_controller(&controller_log);

    let sections = |node: usize| {
        format!(
            "{}{}{}",
            kubernetes_section(&agent_access.kubeconfigs[node - 1]),
            broker.agent_section(&topology, node),
            ca.agent_section("cluster.local")
        )
    };
    let agents: Vec<Agent> = (1..=2)
        .map(|node| {
            Agent::start_overlay_without_inventory(&topology, node, VNI, &sections(node)).unwrap()
        })
        .collect();
    wait_for("both agents on the bus", Duration::from_secs(30), || {
        agents.iter().all(Agent::bus_connected)
    });
    // A first pod, so the consumer groups have joined and are polling.
    let web1 = PodRef::new(1, 1);
    run_pod(&client, "web-1", 1, web1.ip(), Some("enabled")).await;
    wait_for("node 1's pod local", Duration::from_secs(10), || {
        endpoint_mac(&agents[0], web1.ip()).is_some()
    });
    std::thread::sleep(Duration::from_secs(8));

    // Node 2 learns the moved pod from the API server (its own pod); node 1
    // from the controller's event, as a /32 to node 2 beating its own CIDR.
    run_pod(&client, "moved", 2, moved.ip(), Some("enabled")).await;
    let took = wait_for(
        "node 1 routes the moved pod to node 2",
        Duration::from_secs(20),
        || route(&agents[0], &format!("{}/32", moved.ip())).as_deref() == Some("198.18.0.2"),
    );
    eprintln!(
        "pod status written → other node's route (API → controller → Kafka → agent): {took:?}"
    );
    wait_for(
        "node 2 has the moved pod locally",
        Duration::from_secs(5),
        || endpoint_mac(&agents[1], moved.ip()).is_some(),
    );
    veil_testbed::traffic::ping(&topology, web1, moved.ip(), 3).unwrap_or_else(|e| {
        panic!(
            "{e}\ncontroller log:\n{}",
            std::fs::read_to_string(&controller_log).unwrap_or_default()
        )
    });

    // Meshed both ends: TCP crosses in mTLS, and the agents publish it.
    veil_testbed::traffic::tcp_echo(&topology, web1, moved, 8080, 64 * 1024).unwrap();
    let reader = KafkaSettings {
        brokers: vec![broker.address()],
        state_dir: topology.workdir().join("flow-reader"),
        ..KafkaSettings::default()
    };
    let is_flow = |event: &Event| {
        matches!(event, Event::Flow { source, destination, result, .. }
            if source.contains("shop/web-1") && destination.contains("shop/moved") && result == "ok")
    };
    let flows = {
        let reader = reader.clone();
        topology
            .node(1)
            .run(move || {
                read_until(
                    &reader,
                    "flow-reader",
                    Topic::Flows,
                    Duration::from_secs(30),
                    is_flow,
                )
            })
            .unwrap()
    };
    let Some(Event::Flow { bytes, .. }) = flows.iter().find(|e| is_flow(e)) else {
        panic!("no flow web-1 → moved on veil.flows: {flows:?}")
    };
    assert!(*bytes >= 2 * 64 * 1024, "bytes both ways: {bytes}");

    // The agents' certificates are announced on veil.certificates ...
    let certificates = {
        let reader = reader.clone();
        topology
            .node(1)
            .run(move || {
                read_until(&reader, "cert-reader", Topic::Certificates, Duration::from_secs(30), |e| {
                    matches!(e, Event::CertificateIssued { identity, .. } if identity.ends_with("/ns/shop/sa/web"))
                })
            })
            .unwrap()
    };
    assert!(
        certificates.iter().any(|e| matches!(e, Event::CertificateIssued { identity, .. } if identity == "spiffe://cluster.local/ns/shop/sa/web")),
        "{certificates:?}"
    );
    // ... and the controller logs policy changes on veil.policy.
    let policy = veil_kubebed::objects::documents(
        "apiVersion: veil.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: web, namespace: shop}\nspec: {serviceAccount: web, mode: STRICT}\n",
    );
    veil_kubebed::objects::apply(&client, &policy[0], FIELD_MANAGER, false)
        .await
        .unwrap();
    let changes = topology
        .node(1)
        .run(move || {
            read_until(
                &reader,
                "policy-reader",
                Topic::Policy,
                Duration::from_secs(30),
                |e| matches!(e, Event::PolicyChanged { name, .. } if name == "shop/web"),
            )
        })
        .unwrap();
    assert!(
        changes
            .iter()
            .any(|e| matches!(e, Event::PolicyChanged { name, .. } if name == "shop/web")),
        "{changes:?}"
    );

    delete_pod(&client, "moved").await;
    let took = wait_for("the /32 removed on node 1", Duration::from_secs(20), || {
        route(&agents[0], &format!("{}/32", moved.ip())).is_none()
    });
    eprintln!("pod deleted → other node's route gone: {took:?}");

    // A pod deleted while no controller runs: no watch will ever report it,
    // so the next controller finds it in veil.pods (read back at start) and
    // announces it deleted after its first list.
    run_pod(&client, "late", 2, moved.ip(), Some("enabled")).await;
    wait_for(
        "node 1 routes the late pod",
        Duration::from_secs(20),
        || route(&agents[0], &format!("{}/32", moved.ip())).is_some(),
    );
    controller.stop();
    delete_pod(&client, "late").await;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        route(&agents[0], &format!("{}/32", moved.ip())).is_some(),
        "nobody told node 1 yet"
    );
    let restarted_log = topology.workdir().join("controller-2.log");
    let _controller = start_controller(&restarted_log);
    let took = veil_testbed::try_wait_for(
        "the /32 of the pod deleted while no controller ran removed on node 1",
        Duration::from_secs(60),
        || route(&agents[0], &format!("{}/32", moved.ip())).is_none(),
    )
    .unwrap_or_else(|error| {
        panic!(
            "{error}\nrestarted controller's log:\n{}\n{}\nnode 1's agent log:\n{}",
            std::fs::read_to_string(&restarted_log).unwrap_or_default(),
            std::fs::read_to_string(restarted_log.with_extension("err")).unwrap_or_default(),
            agents[0].log()
        )
    });
    eprintln!("controller restarted → deletion announced and applied: {took:?}");
    let log = std::fs::read_to_string(&restarted_log).unwrap_or_default();
    assert!(log.contains("pod events read back from the topic"), "{log}");
    drop(agents);
}

/// Events of `topic` read by a consumer group of its own (`group`), until
/// one satisfies `wanted` or `timeout` passes; all that were seen.
fn read_until(
    settings: &KafkaSettings,
    group: &str,
    topic: Topic,
    timeout: Duration,
    wanted: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let bus = KafkaBus::connect(settings).unwrap();
    let mut consumer = bus.subscribe(group, &[topic]).unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < timeout {
        for delivery in consumer
            .poll(100, Duration::from_millis(500))
            .unwrap_or_default()
        {
            if let Ok(envelope) = delivery.event {
                seen.push(envelope.event);
            }
        }
        if seen.iter().any(&wanted) {
            break;
        }
    }
    seen
}
