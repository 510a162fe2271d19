//! `cargo xtask deploy`: Veil's Kubernetes manifests, rendered for one cluster
//! and applied with `kubectl apply --server-side` (or printed with `--dry-run`).
//!
//! The manifests in `deploy/crds/` and `deploy/kubernetes/` are plain YAML with
//! `{{name}}` placeholders, readable and reviewable as they are; rendering is
//! simple substitution of validated values. No template language: a
//! placeholder this module does not know, or one left unfilled, is an error
//! naming its file and line, so a typo never reaches the cluster.

use std::{
    fs,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{paths, shell::step};

/// Options of `cargo xtask deploy` (the doc comments are its `--help`).
#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Namespace for the agent, the controller and their settings.
    #[arg(long, default_value = "veil-system")]
    pub namespace: String,
    /// Container image holding veil-agent and veil-controller
    /// [default: ghcr.io/veil-mesh/veil:<workspace version>].
    #[arg(long)]
    pub image: Option<String>,
    /// SPIFFE trust domain of workload identities (spiffe://<trust-domain>/ns/…/sa/…).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// VXLAN network identifier of the overlay (1 to 16777215).
    #[arg(long, default_value_t = 4242,
          value_parser = clap::value_parser!(u32).range(1..=0x00ff_ffff))]
    pub vni: u32,
    /// Underlay interface of the nodes (the agent's datapath.underlay_interface).
    #[arg(long, default_value = "eth0")]
    pub underlay_interface: String,
    /// Kafka bootstrap servers, host:port[,host:port…]; without them the
    /// control plane uses its embedded bus.
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// Also write each workload certificate and key into a `kubernetes.io/tls`
    /// Secret (`veil-tls.<sa>.<node>`; the agent writes, the controller's
    /// finalizer deletes). Off by default: Veil keeps private keys out of the
    /// API server, and neither component then has any Secret access.
    #[arg(long)]
    pub secret_writing: bool,
    /// Print the rendered manifests instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Passed to `kubectl apply --dry-run=…`: `server` has the API server
    /// validate and admit everything without persisting it.
    #[arg(long, value_name = "MODE", value_parser = ["server", "client"])]
    pub kubectl_dry_run: Option<String>,
}

/// The validated values the manifests are rendered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    pub namespace: String,
    pub image: String,
    pub trust_domain: String,
    pub vni: u32,
    pub underlay_interface: String,
    pub kafka_brokers: Option<String>,
    pub secret_writing: bool,
}

impl Values {
    /// Checks every value, so the substitution cannot produce broken YAML or TOML.
    pub fn from_args(args: &DeployArgs) -> Result<Self> {
        let values = Self {
            namespace: args.namespace.clone(),
            image: args.image.clone().unwrap_or_else(default_image),
            trust_domain: args.trust_domain.clone(),
            vni: args.vni,
            underlay_interface: args.underlay_interface.clone(),
            kafka_brokers: args.kafka_brokers.clone(),
            secret_writing: args.secret_writing,
        };
        values.validate()?;
        Ok(values)
    }

    fn validate(&self) -> Result<()> {
        check_dns_label(&self.namespace)?;
        check_image(&self.image)?;
        check_trust_domain(&self.trust_domain)?;
        if !(1..=0x00ff_ffff).contains(&self.vni) {
            bail!("--vni {} is out of range: a VNI is 1 to 16777215", self.vni);
        }
        check_interface(&self.underlay_interface)?;
        if let Some(brokers) = &self.kafka_brokers {
            check_brokers(brokers)?;
        }
        Ok(())
    }

    /// Placeholder name → value.
    fn placeholders(&self) -> Vec<(&'static str, String)> {
        vec![
            ("namespace", self.namespace.clone()),
            ("image", self.image.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("trust_domain", self.trust_domain.clone()),
            ("vni", self.vni.to_string()),
            ("underlay_interface", self.underlay_interface.clone()),
            (
                "kafka_brokers",
                self.kafka_brokers.clone().unwrap_or_default(),
            ),
            ("agent_events", self.agent_events()),
            ("agent_tls_secrets", self.agent_tls_secrets()),
        ]
    }

    /// The agent's Secret-writing setting, one TOML line in `[mesh]`.
    fn agent_tls_secrets(&self) -> String {
        if self.secret_writing {
            "write_tls_secrets = true".into()
        } else {
            "# write_tls_secrets = false: keys stay out of the API server \
             (`cargo xtask deploy --secret-writing` turns it on)"
                .into()
        }
    }

    /// The agent's event-bus setting, one TOML line (it goes before the
    /// config's first table): the brokers when given, else a comment.
    fn agent_events(&self) -> String {
        match &self.kafka_brokers {
            None => "# No Kafka brokers given: the embedded event bus (a journal under \
                     /var/lib/veil/events; nothing arrives from other nodes)."
                .into(),
            Some(brokers) => {
                let list: Vec<String> = brokers
                    .split(',')
                    .map(|b| format!("{:?}", b.trim()))
                    .collect();
                format!(
                    "events = {{ kafka = {{ brokers = [{}], state_dir = \"/var/lib/veil/events\" }} }}",
                    list.join(", ")
                )
            }
        }
    }
}

/// `ghcr.io/veil-mesh/veil:<workspace version>`.
pub fn default_image() -> String {
    format!("ghcr.io/veil-mesh/veil:{}", env!("CARGO_PKG_VERSION"))
}

/// One rendered manifest file.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Relative to `deploy/`, e.g. `kubernetes/40-agent-daemonset.yaml`.
    pub source: String,
    pub yaml: String,
}

/// `cargo xtask deploy` after argument parsing.
pub fn run(args: &DeployArgs) -> Result<()> {
    let values = Values::from_args(args)?;
    let manifests = render(&paths::repo_root().join("deploy"), &values)?;
    let stream = to_stream(&manifests);
    if args.dry_run {
        print!("{stream}");
        return Ok(());
    }
    apply(&stream, args.kubectl_dry_run.as_deref(), manifests.len())
}

/// Renders the CRDs, then `kubernetes/*.yaml` in file-name order (and the
/// optional Secret-writing RBAC when asked for), from the `deploy/` directory.
pub fn render(deploy_dir: &Path, values: &Values) -> Result<Vec<Rendered>> {
    let mut sources = yaml_files(&deploy_dir.join("crds"))?;
    sources.extend(yaml_files(&deploy_dir.join("kubernetes"))?);
    if values.secret_writing {
        sources.push(deploy_dir.join("kubernetes/optional/secret-writing.yaml"));
    }
    let placeholders = values.placeholders();
    sources
        .iter()
        .map(|path| {
            let source = path
                .strip_prefix(deploy_dir)
                .unwrap_or(path)
                .display()
                .to_string();
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let yaml =
                substitute(&text, &placeholders).with_context(|| format!("deploy/{source}"))?;
            check_documents(&yaml).with_context(|| format!("deploy/{source} once rendered"))?;
            Ok(Rendered { source, yaml })
        })
        .collect()
}

/// The `*.yaml` files directly in `dir`, sorted by name.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| {
        format!(
            "cannot list {}: run from a Veil checkout (the manifests live there)",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Replaces each `{{name}}`; unknown names and unclosed braces are errors
/// with their line.
pub fn substitute(text: &str, placeholders: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                bail!("line {}: `{{{{` without a closing `}}}}`", number + 1);
            };
            let name = after[..end].trim();
            let Some((_, value)) = placeholders.iter().find(|(known, _)| *known == name) else {
                let known: Vec<_> = placeholders.iter().map(|(k, _)| *k).collect();
                bail!(
                    "line {}: unknown placeholder {{{{{name}}}}}; known ones are {}",
                    number + 1,
                    known.join(", ")
                );
            };
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
    }
    if let Some(line) = out.lines().position(|l| l.contains("{{")) {
        bail!(
            "line {}: a placeholder is left after rendering (a value contains braces?)",
            line + 1
        );
    }
    Ok(out)
}

/// Every document parses as YAML and names its apiVersion, kind and name.
fn check_documents(yaml: &str) -> Result<()> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        api_version: String,
        kind: String,
        metadata: Metadata,
    }
    #[derive(Deserialize)]
    struct Metadata {
        name: String,
    }
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let head = Head::deserialize(document)
            .with_context(|| format!("document {} is not a Kubernetes object", index + 1))?;
        if head.api_version.is_empty() || head.kind.is_empty() || head.metadata.name.is_empty() {
            bail!(
                "document {} lacks apiVersion, kind or metadata.name",
                index + 1
            );
        }
    }
    Ok(())
}

/// One multi-document YAML stream, each file headed by its source.
pub fn to_stream(manifests: &[Rendered]) -> String {
    let mut stream = String::new();
    for manifest in manifests {
        stream.push_str(&format!("---\n# Source: deploy/{}\n", manifest.source));
        let body = manifest.yaml.trim_start_matches("---\n");
        stream.push_str(body);
        if !body.ends_with('\n') {
            stream.push('\n');
        }
    }
    stream
}

/// Pipes the stream to `kubectl apply --server-side -f -`.
fn apply(stream: &str, kubectl_dry_run: Option<&str>, files: usize) -> Result<()> {
    let mut command = Command::new("kubectl");
    command.args([
        "apply",
        "--server-side",
        "--field-manager=veil-xtask",
        "-f",
        "-",
    ]);
    if let Some(mode) = kubectl_dry_run {
        command.arg(format!("--dry-run={mode}"));
    }
    step(&format!(
        "Applying {files} manifest files (kubectl apply --server-side{})",
        kubectl_dry_run
            .map(|m| format!(" --dry-run={m}"))
            .unwrap_or_default()
    ));
    let mut child = match command.stdin(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "kubectl is not installed (or not on PATH): install it \
             (https://kubernetes.io/docs/tasks/tools/), or use --dry-run to print the \
             manifests and apply them another way"
        ),
        Err(e) => return Err(e).context("cannot start kubectl"),
    };
    let mut stdin = child.stdin.take().context("kubectl's stdin is piped")?;
    let written = stdin.write_all(stream.as_bytes());
    drop(stdin);
    let status = child.wait().context("kubectl did not finish")?;
    written.context("cannot send the manifests to kubectl")?;
    if !status.success() {
        bail!(
            "kubectl apply failed ({status}): see its message above; check the context \
             (`kubectl config current-context`) and your permissions (applying CRDs and \
             ClusterRoles needs cluster-admin), or use --dry-run to inspect the manifests"
        );
    }
    Ok(())
}

fn check_dns_label(namespace: &str) -> Result<()> {
    let valid = (1..=63).contains(&namespace.len())
        && namespace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !namespace.starts_with('-')
        && !namespace.ends_with('-');
    if !valid {
        bail!(
            "--namespace {namespace:?} is not a valid namespace name: 1 to 63 lowercase \
             letters, digits and '-', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

fn check_image(image: &str) -> Result<()> {
    let valid = !image.is_empty()
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
    if !valid {
        bail!(
            "--image {image:?} is not an image reference (like ghcr.io/veil-mesh/veil:0.1.0): \
             letters, digits and . _ - / : @ only"
        );
    }
    Ok(())
}

fn check_trust_domain(domain: &str) -> Result<()> {
    let valid = (1..=255).contains(&domain.len())
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c));
    if !valid {
        bail!(
            "--trust-domain {domain:?} is not a SPIFFE trust domain (like cluster.local): \
             lowercase letters, digits, '.', '-' and '_' only"
        );
    }
    Ok(())
}

fn check_interface(name: &str) -> Result<()> {
    let valid = (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_@".contains(c));
    if !valid {
        bail!(
            "--underlay-interface {name:?} is not a Linux interface name (1 to 15 letters, \
             digits, '.', '-', '_' or '@')"
        );
    }
    Ok(())
}

fn check_brokers(brokers: &str) -> Result<()> {
    for broker in brokers.split(',') {
        let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            bail!(
                "--kafka-brokers: {broker:?} is not host:port (give a comma-separated list, \
                 like kafka-0.kafka:9092,kafka-1.kafka:9092)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders() -> Vec<(&'static str, String)> {
        vec![("namespace", "veil-system".into()), ("vni", "7".into())]
    }

    #[test]
    fn placeholders_are_replaced_wherever_they_are() {
        let out = substitute(
            "namespace: \"{{namespace}}\"\nvni = {{ vni }} # {{vni}}\n",
            &placeholders(),
        )
        .unwrap();
        assert_eq!(out, "namespace: \"veil-system\"\nvni = 7 # 7\n");
    }

    #[test]
    fn unknown_and_unclosed_placeholders_are_refused_with_their_line() {
        let error = substitute("a: 1\nb: {{namespce}}\n", &placeholders())
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("{{namespce}}"), "{error}");
        assert!(error.contains("namespace, vni"), "{error}");
        let error = substitute("a: {{namespace\n", &placeholders())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 1") && error.contains("closing"),
            "{error}"
        );
    }

    #[test]
    fn values_that_would_break_the_manifests_are_refused() {
        let good = Values {
            namespace: "veil-system".into(),
            image: default_image(),
            trust_domain: "cluster.local".into(),
            vni: 4242,
            underlay_interface: "eth0".into(),
            kafka_brokers: Some("kafka-0.kafka:9092,10.0.0.7:9093".into()),
            secret_writing: false,
        };
        good.validate().unwrap();
        let cases: Vec<(Values, &str)> = vec![
            (
                Values {
                    namespace: "Veil".into(),
                    ..good.clone()
                },
                "--namespace",
            ),
            (
                Values {
                    namespace: "veil-".into(),
                    ..good.clone()
                },
                "--namespace",
            ),
            (
                Values {
                    image: "x\" y".into(),
                    ..good.clone()
                },
                "--image",
            ),
            (
                Values {
                    trust_domain: "Cluster/Local".into(),
                    ..good.clone()
                },
                "--trust-domain",
            ),
            (
                Values {
                    vni: 0,
                    ..good.clone()
                },
                "--vni",
            ),
            (
                Values {
                    underlay_interface: "a-very-long-interface".into(),
                    ..good.clone()
                },
                "--underlay-interface",
            ),
            (
                Values {
                    kafka_brokers: Some("kafka:notaport".into()),
                    ..good.clone()
                },
                "--kafka-brokers",
            ),
            (
                Values {
                    kafka_brokers: Some("kafka:9092,".into()),
                    ..good.clone()
                },
                "--kafka-brokers",
            ),
        ];
        for (values, option) in cases {
            let error = values.validate().unwrap_err().to_string();
            assert!(error.contains(option), "{values:?}: {error}");
        }
    }

    #[test]
    fn a_template_with_an_unknown_placeholder_is_refused_with_its_file() {
        let deploy = tempfile::tempdir().unwrap();
        fs::create_dir_all(deploy.path().join("crds")).unwrap();
        fs::create_dir_all(deploy.path().join("kubernetes")).unwrap();
        fs::write(
            deploy.path().join("kubernetes/00-ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{{namespaces}}\"\n",
        )
        .unwrap();
        let values = Values::from_args(&DeployArgs {
            namespace: "veil-system".into(),
            image: None,
            trust_domain: "cluster.local".into(),
            vni: 4242,
            underlay_interface: "eth0".into(),
            kafka_brokers: None,
            secret_writing: false,
            dry_run: true,
            kubectl_dry_run: None,
        })
        .unwrap();
        let error = format!("{:#}", render(deploy.path(), &values).unwrap_err());
        assert!(error.contains("deploy/kubernetes/00-ns.yaml"), "{error}");
        assert!(
            error.contains("line 4") && error.contains("{{namespaces}}"),
            "{error}"
        );
    }
}
