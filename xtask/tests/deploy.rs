//! `cargo xtask deploy`: the rendered manifests, checked without a cluster.
//!
//! Every document is deserialized into its k8s-openapi type and serialized
//! back; a field in the wrong place or misspelt is dropped on the way and
//! shows up as a difference. Then the properties the README promises are
//! asserted: capabilities, host networking, probes, least-privilege RBAC,
//! and an agent config the agent's own parser accepts.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use veil_agent::config::AgentConfig;

const ADDED_CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "NET_RAW"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("the xtask binary runs")
}

/// `cargo xtask deploy --dry-run <args>`'s output; must succeed.
fn render(args: &[&str]) -> String {
    let output = xtask(&[&["deploy", "--dry-run"], args].concat());
    assert!(
        output.status.success(),
        "deploy --dry-run failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Every object of the stream, typed.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    crds: Vec<CustomResourceDefinition>,
    admission_policies: Vec<ValidatingAdmissionPolicy>,
    admission_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    /// (kind, namespace or None) of each object, for the namespace checks.
    placements: Vec<(String, String, Option<String>)>,
}

fn parse(stream: &str) -> Objects {
    let mut objects = Objects::default();
    for document in serde_yaml::Deserializer::from_str(stream) {
        let value = Value::deserialize(document).expect("every document is YAML");
        let kind = value["kind"].as_str().expect("every document has a kind");
        objects.placements.push((
            kind.to_owned(),
            value["metadata"]["name"].as_str().unwrap().to_owned(),
            value["metadata"]["namespace"].as_str().map(str::to_owned),
        ));
        match kind {
            "Namespace" => objects.namespaces.push(typed(&value)),
            "ServiceAccount" => objects.service_accounts.push(typed(&value)),
            "ClusterRole" => objects.cluster_roles.push(typed(&value)),
            "ClusterRoleBinding" => objects.cluster_role_bindings.push(typed(&value)),
            "Role" => objects.roles.push(typed(&value)),
            "RoleBinding" => objects.role_bindings.push(typed(&value)),
            "ConfigMap" => objects.config_maps.push(typed(&value)),
            "DaemonSet" => objects.daemon_sets.push(typed(&value)),
            "Deployment" => objects.deployments.push(typed(&value)),
            "PodDisruptionBudget" => objects.disruption_budgets.push(typed(&value)),
            "CustomResourceDefinition" => objects.crds.push(typed(&value)),
            "ValidatingAdmissionPolicy" => objects.admission_policies.push(typed(&value)),
            "ValidatingAdmissionPolicyBinding" => objects.admission_bindings.push(typed(&value)),
            other => panic!("unexpected kind {other}: add it to this test"),
        }
    }
    objects
}

/// Deserializes into `T` and back; anything `T` does not know is a failure.
fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{} does not deserialize: {e}\n{value:#}", value["kind"]));
    let back = serde_json::to_value(&object).unwrap();
    let mut lost = Vec::new();
    differences("", value, &back, &mut lost);
    assert!(
        lost.is_empty(),
        "{} {} has fields its type does not know (or in the wrong place):\n{}",
        value["kind"],
        value["metadata"]["name"],
        lost.join("\n")
    );
    object
}

/// JSON paths where what was written and what its type kept differ.
fn differences(path: &str, written: &Value, typed: &Value, out: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let at = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => differences(&at, value, other, out),
                    None => out.push(format!("{at}: dropped")),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key}: added"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} became {b}")),
        _ => {}
    }
}

fn pod_spec(objects: &Objects, kind: &str) -> PodSpec {
    let template = match kind {
        "DaemonSet" => &objects.daemon_sets[0].spec.as_ref().unwrap().template,
        _ => &objects.deployments[0].spec.as_ref().unwrap().template,
    };
    template.spec.clone().unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers.iter().find(|c| c.name == name).unwrap()
}

fn config_map<'a>(objects: &'a Objects, name: &str) -> &'a ConfigMap {
    objects
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))
}

fn all_rules(objects: &Objects) -> Vec<(String, PolicyRule)> {
    let cluster = objects.cluster_roles.iter().flat_map(|role| {
        let name = role.metadata.name.clone().unwrap();
        role.rules
            .iter()
            .flatten()
            .map(move |r| (name.clone(), r.clone()))
    });
    let namespaced = objects.roles.iter().flat_map(|role| {
        let name = role.metadata.name.clone().unwrap();
        role.rules
            .iter()
            .flatten()
            .map(move |r| (name.clone(), r.clone()))
    });
    cluster.chain(namespaced).collect()
}

fn rules_of(objects: &Objects, role: &str) -> Vec<PolicyRule> {
    all_rules(objects)
        .into_iter()
        .filter(|(name, _)| name == role)
        .map(|(_, rule)| rule)
        .collect()
}

fn grants(rules: &[PolicyRule], resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.resources.iter().flatten().any(|x| x == resource) && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn default_render_is_well_typed_and_complete() {
    let stream = render(&[]);
    assert!(!stream.contains("{{"), "a placeholder is left:\n{stream}");
    let objects = parse(&stream);
    assert_eq!(objects.namespaces.len(), 1);
    assert_eq!(
        objects.crds.len(),
        2,
        "the ECDSACert and MTLSPolicy CRDs from deploy/crds"
    );
    assert_eq!(objects.daemon_sets.len(), 1);
    assert_eq!(objects.deployments.len(), 1);
    assert_eq!(objects.disruption_budgets.len(), 1);
    assert_eq!(
        objects.admission_policies.len(),
        1,
        "the policy binding agents to their own node"
    );
    let bound = objects.admission_bindings[0].spec.as_ref().unwrap();
    assert_eq!(bound.policy_name.as_deref(), Some("veil-agent-own-node"));
    assert_eq!(
        bound.validation_actions.as_deref(),
        Some(&["Deny".to_owned()][..])
    );
    for (kind, name, namespace) in &objects.placements {
        let cluster_scoped = matches!(
            kind.as_str(),
            "Namespace"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "CustomResourceDefinition"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
        );
        let expected = (!cluster_scoped).then(|| "veil-system".to_owned());
        assert_eq!(namespace, &expected, "{kind} {name}");
    }
    let image = format!("ghcr.io/veil-mesh/veil:{}", env!("CARGO_PKG_VERSION"));
    for spec in [
        pod_spec(&objects, "DaemonSet"),
        pod_spec(&objects, "Deployment"),
    ] {
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            assert_eq!(c.image.as_deref(), Some(image.as_str()), "{}", c.name);
        }
        let account = spec.service_account_name.unwrap();
        assert!(
            objects
                .service_accounts
                .iter()
                .any(|sa| sa.metadata.name.as_deref() == Some(account.as_str())),
            "service account {account} is not in the manifests"
        );
    }
    let cluster = config_map(&objects, "veil-cluster").data.clone().unwrap();
    assert_eq!(cluster["trust-domain"], "cluster.local");
    assert_eq!(cluster["kafka-brokers"], "");
}

#[test]
fn the_agent_runs_on_the_host_network_with_exactly_the_documented_capabilities() {
    let objects = parse(&render(&[]));
    let spec = pod_spec(&objects, "DaemonSet");
    assert_eq!(spec.host_network, Some(true));
    assert_ne!(spec.host_pid, Some(true));
    assert_ne!(spec.host_ipc, Some(true));
    let agent = container(&spec, "agent");
    let security = agent.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.unwrap();
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    let added: BTreeSet<String> = capabilities.add.unwrap().into_iter().collect();
    let expected: BTreeSet<String> = ADDED_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    assert_eq!(added, expected);

    // Every added capability is justified in deploy/README.md.
    let readme = fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    for capability in ADDED_CAPABILITIES {
        assert!(
            readme.contains(&format!("| `{capability}` |")),
            "deploy/README.md does not justify {capability}"
        );
    }

    // Init containers get nothing.
    for init in spec.init_containers.iter().flatten() {
        let caps = init.security_context.clone().unwrap().capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]), "{}", init.name);
        assert_eq!(caps.add, None, "{}", init.name);
    }

    let probe = agent.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    let ports = agent.ports.clone().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 15020),
        "{ports:?}"
    );

    let mounts: BTreeSet<(String, bool)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.clone(), m.read_only == Some(true)))
        .collect();
    for (path, read_only) in [
        ("/sys/fs/bpf", false),
        ("/sys/fs/cgroup", true),
        ("/etc/veil", true),
    ] {
        assert!(
            mounts.contains(&(path.to_owned(), read_only)),
            "{path}: {mounts:?}"
        );
    }
    let volumes = spec.volumes.unwrap();
    let config = volumes.iter().find(|v| v.name == "config").unwrap();
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        "veil-agent-config"
    );
    for host in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(
            volumes
                .iter()
                .any(|v| v.host_path.as_ref().is_some_and(|h| h.path == host)),
            "no hostPath volume for {host}"
        );
    }
}

#[test]
fn the_agent_config_in_the_config_map_is_accepted_by_the_agent() {
    let objects = parse(&render(&["--vni", "77", "--underlay-interface", "ens5"]));
    let data = config_map(&objects, "veil-agent-config")
        .data
        .clone()
        .unwrap();
    // The init container fills in the node's name.
    assert!(data["agent.toml"].contains("@NODE_NAME@"));
    let text = data["agent.toml"].replace("@NODE_NAME@", "node-a.example");
    let config =
        AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node_name, "node-a.example");
    assert_eq!(config.datapath.underlay_interface, "ens5");
    assert_eq!(
        config.event_bus(),
        Some(veil_agent::config::EventBusChoice::Embedded(
            "/var/lib/veil/events".into()
        )),
        "no brokers given: the embedded bus, on the node's /var/lib/veil"
    );
    let overlay = config.overlay.unwrap();
    assert_eq!(overlay.vni, 77);
    assert_eq!(
        overlay.inventory, None,
        "nodes and pods come from the API server"
    );
    let kubernetes = config.kubernetes.expect("a [kubernetes] section");
    assert_eq!(kubernetes.kubeconfig, None, "in-cluster credentials");
    let mesh = config.mesh.expect("a [mesh] section");
    assert_eq!(mesh.issuer, veil_agent::config::MeshIssuer::Kubernetes);
    assert_eq!(mesh.ca_key, None, "no CA key on the nodes");

    assert!(config.admin_listen.ip().is_loopback());
    assert_eq!(config.readiness_listen.port(), 15021);
    assert_eq!(config.metrics_listen.port(), 15020);

    // With brokers, the agent joins the bus.
    let objects = parse(&render(&["--kafka-brokers", "kafka-0:9092,kafka-1:9092"]));
    let data = config_map(&objects, "veil-agent-config")
        .data
        .clone()
        .unwrap();
    let text = data["agent.toml"].replace("@NODE_NAME@", "node-a");
    let config =
        AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_or_else(|e| panic!("{e}"));
    let kafka = config
        .events
        .expect("an event bus")
        .kafka
        .expect("[events.kafka]");
    assert_eq!(kafka.brokers, ["kafka-0:9092", "kafka-1:9092"]);
    assert_eq!(kafka.state_dir, Path::new("/var/lib/veil/events"));

    // The init container's rendering and check match the agent's arguments.
    let spec = pod_spec(&objects, "DaemonSet");
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let script = init.args.as_ref().unwrap().join(" ");
    assert!(script.contains("s/@NODE_NAME@/$(NODE_NAME)/"), "{script}");
    assert!(
        script.contains("check-config --config /run/veil/agent.toml"),
        "{script}"
    );
    let agent = container(&spec, "agent");
    assert_eq!(
        agent.args.as_deref(),
        Some(
            &[
                "run".to_owned(),
                "--config".into(),
                "/run/veil/agent.toml".into()
            ][..]
        )
    );
}

#[test]
fn rbac_is_least_privilege() {
    let objects = parse(&render(&[]));
    for (role, rule) in all_rules(&objects) {
        for list in [
            &rule.verbs,
            rule.resources.as_ref().unwrap(),
            rule.api_groups.as_ref().unwrap(),
        ] {
            assert!(
                !list.iter().any(|x| x == "*"),
                "{role} uses a wildcard: {rule:?}"
            );
        }
        assert!(
            !rule.resources.iter().flatten().any(|r| r == "secrets"),
            "{role} may touch Secrets without --secret-writing"
        );
    }
    let agent = rules_of(&objects, "veil-agent");
    for (resource, verb) in [
        ("pods", "watch"),
        ("nodes", "watch"),
        ("ecdsacerts", "create"),
    ] {
        assert!(
            grants(&agent, resource, verb),
            "agent cannot {verb} {resource}"
        );
    }
    assert!(
        !grants(&agent, "ecdsacerts/status", "update"),
        "the agent must not write status"
    );
    assert!(!grants(&agent, "leases", "get"));

    let controller = rules_of(&objects, "veil-controller");
    for (resource, verb) in [
        ("ecdsacerts", "watch"),
        ("ecdsacerts/status", "patch"),
        ("ecdsacerts/finalizers", "update"),
        ("pods", "get"),
        ("serviceaccounts", "list"),
        ("events", "create"),
    ] {
        assert!(
            grants(&controller, resource, verb),
            "controller cannot {verb} {resource}"
        );
    }
    assert!(
        !grants(&controller, "leases", "get"),
        "leases belong in the namespaced Role"
    );
    let election = rules_of(&objects, "veil-controller-leader-election");
    assert!(grants(&election, "leases", "update"));
    assert_eq!(
        objects.roles[0].metadata.namespace.as_deref(),
        Some("veil-system")
    );

    let deployment = objects.deployments[0].spec.as_ref().unwrap();
    assert_eq!(deployment.replicas, Some(2));
}

#[test]
fn custom_values_land_everywhere_and_secret_writing_is_opt_in() {
    let stream = render(&[
        "--namespace",
        "mesh",
        "--image",
        "registry.example:5000/veil:dev",
        "--trust-domain",
        "example.org",
        "--kafka-brokers",
        "kafka-0.kafka:9092,kafka-1.kafka:9092",
        "--secret-writing",
    ]);
    assert!(
        !stream.contains("veil-system"),
        "the default namespace is left:\n{stream}"
    );
    assert!(!stream.contains("{{"));
    let objects = parse(&stream);
    assert_eq!(objects.namespaces[0].metadata.name.as_deref(), Some("mesh"));
    for (kind, name, namespace) in &objects.placements {
        if let Some(namespace) = namespace {
            assert_eq!(namespace, "mesh", "{kind} {name}");
        }
    }
    for binding in &objects.cluster_role_bindings {
        for subject in binding.subjects.iter().flatten() {
            assert_eq!(subject.namespace.as_deref(), Some("mesh"));
        }
    }
    // The admission policy applies to the agent of this namespace.
    let agent_only = &objects.admission_policies[0]
        .spec
        .as_ref()
        .unwrap()
        .match_conditions
        .as_ref()
        .unwrap()[0]
        .expression;
    assert!(
        agent_only.contains("'system:serviceaccount:mesh:veil-agent'"),
        "{agent_only}"
    );
    let spec = pod_spec(&objects, "Deployment");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("registry.example:5000/veil:dev")
    );
    let cluster = config_map(&objects, "veil-cluster").data.clone().unwrap();
    assert_eq!(cluster["trust-domain"], "example.org");
    assert_eq!(
        cluster["kafka-brokers"],
        "kafka-0.kafka:9092,kafka-1.kafka:9092"
    );

    // The agent (which holds the keys) writes; the controller's finalizer deletes.
    let writing = rules_of(&objects, "veil-agent-secret-writing");
    assert!(grants(&writing, "secrets", "create") && grants(&writing, "secrets", "patch"));
    assert!(!grants(&writing, "secrets", "delete"));
    let cleanup = rules_of(&objects, "veil-controller-secret-cleanup");
    assert!(grants(&cleanup, "secrets", "delete"));
    assert!(!grants(&cleanup, "secrets", "patch"));
    for rules in [&writing, &cleanup] {
        assert!(
            !["get", "list", "watch"]
                .iter()
                .any(|v| grants(rules, "secrets", v)),
            "secret writing must not read Secrets: {rules:?}"
        );
    }
}

#[test]
fn bad_values_are_refused_before_anything_is_printed() {
    let output = xtask(&["deploy", "--dry-run", "--namespace", "Not_Valid"]);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--namespace") && stderr.contains("lowercase"),
        "{stderr}"
    );
    let output = xtask(&["deploy", "--dry-run", "--vni", "0"]);
    assert!(!output.status.success());
}

/// A `kubectl` stand-in on PATH that records its arguments and input.
fn fake_kubectl(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let script = bin.join("kubectl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" > {0}/args\ncat > {0}/stdin\n",
            dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn apply_pipes_the_manifests_to_kubectl_server_side() {
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_kubectl(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["deploy", "--kubectl-dry-run", "server"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let args = fs::read_to_string(dir.path().join("args")).unwrap();
    assert_eq!(
        args.trim(),
        "apply --server-side --field-manager=veil-xtask -f - --dry-run=server"
    );
    let sent = fs::read_to_string(dir.path().join("stdin")).unwrap();
    assert_eq!(
        sent,
        render(&[]),
        "kubectl got something else than --dry-run prints"
    );
}

#[test]
fn a_missing_kubectl_is_explained() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("deploy")
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("kubectl is not installed") && stderr.contains("--dry-run"),
        "{stderr}"
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Topics {
    topics: Vec<Topic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Topic {
    name: String,
    role: String,
    partitions: u32,
    replication_factor: u32,
    config: std::collections::BTreeMap<String, String>,
}

#[test]
fn kafka_topics_cover_every_event_role() {
    let text = fs::read_to_string(repo_root().join("deploy/kafka/topics.yaml")).unwrap();
    let file: Topics = serde_yaml::from_str(&text).unwrap();
    let roles: Vec<&str> = file.topics.iter().map(|t| t.role.as_str()).collect();
    let expected: Vec<&str> = veil_events::schema::Topic::ALL
        .iter()
        .map(|t| t.name())
        .collect();
    assert_eq!(roles, expected);
    for topic in &file.topics {
        assert_eq!(topic.name, format!("veil.{}", topic.role));
        assert!(
            topic.partitions > 0 && topic.replication_factor >= 3,
            "{}",
            topic.name
        );
        let policy = topic.config["cleanup.policy"].as_str();
        assert!(
            matches!(policy, "compact" | "delete"),
            "{}: {policy}",
            topic.name
        );
        let min_insync: u32 = topic.config["min.insync.replicas"].parse().unwrap();
        assert!(min_insync < topic.replication_factor, "{}", topic.name);
        if policy == "delete" {
            assert!(topic.config.contains_key("retention.ms"), "{}", topic.name);
        }
    }
}

#[test]
fn only_the_controller_mounts_the_ca_key_and_the_agents_get_the_root_certificate() {
    let objects = parse(&render(&[]));
    let agent = pod_spec(&objects, "DaemonSet");
    let volumes = agent.volumes.clone().unwrap();
    let root = volumes.iter().find(|v| v.name == "mesh-root").unwrap();
    assert_eq!(root.config_map.as_ref().unwrap().name, "veil-mesh-root");
    assert!(
        volumes.iter().all(|v| v.secret.is_none()),
        "no Secret (and so no CA key) on the nodes' agents"
    );
    let data = config_map(&objects, "veil-agent-config")
        .data
        .clone()
        .unwrap();
    let mount = container(&agent, "agent")
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "mesh-root")
        .unwrap()
        .mount_path
        .clone();
    assert!(
        data["agent.toml"].contains(&format!("ca_cert = \"{mount}/ca.crt\"")),
        "the agent's [mesh] names the mounted root"
    );

    let controller = pod_spec(&objects, "Deployment");
    let ca = controller
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "mesh-ca")
        .unwrap();
    let secret = ca.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("veil-mesh-ca"));
    assert_eq!(secret.default_mode, Some(0o400));
    let mounted = container(&controller, "controller")
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .any(|m| {
            m.name == "mesh-ca" && m.mount_path == "/etc/veil/ca" && m.read_only == Some(true)
        });
    assert!(
        mounted,
        "the controller reads tls.crt and tls.key from /etc/veil/ca"
    );
}
