//! What the running kernel accepts, probed when the agent starts.
//!
//! Kernels differ by version, by distribution config and even between builds
//! of one version (a 6.18.44 build here refuses `bpf_xdp_adjust_meta` in
//! XDP that other builds accept). So nothing is read off a version number:
//! each helper and program type is probed by loading a tiny program (aya's
//! `is_helper_supported` / `is_program_supported`, which read the verifier's
//! answer), each attach path by attaching a do-nothing program to `lo` for
//! a moment ([`probe_attach_paths`]), and the TLS ULP by asking for it
//! ([`veil_mtls::ktls::kernel_supports_tls`]). Native XDP is a property of
//! the underlay's driver and is found at attach time ([`super::attach`]).
//!
//! A feature the datapath cannot do without is *required*: without it the
//! agent does not start, and says which feature and the oldest kernel that
//! has it. The others have a fallback, named in [`Feature::fallback`],
//! chosen in [`super::choices`] and shown by `veilctl status`.
//!
//! Tests force optional features off with `VEIL_TEST_DISABLE_FEATURES`
//! (comma-separated [`Feature::name`]s), to prove each fallback.

use std::collections::BTreeSet;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// The test-only switch that makes the agent treat features as missing.
pub const DISABLE_FEATURES_ENV: &str = "VEIL_TEST_DISABLE_FEATURES";

/// Everything the datapath uses that a kernel may lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    XdpPrograms,
    TcPrograms,
    RingBuffer,
    DevMapHash,
    LpmTrie,
    XdpAdjustHead,
    XdpRedirectMap,
    SkbAdjustRoom,
    Redirect,
    SkbSetTunnelKey,
    GetHashRecalc,
    SkbChangeTail,
    SkcLookupTcp,
    SkAssign,
    SkRelease,
    RingbufOutput,
    XdpLink,
    NativeXdp,
    XdpMetadata,
    RedirectPeer,
    Tcx,
    SkLookup,
    TlsUlp,
}

impl Feature {
    pub const ALL: [Feature; 23] = [
        Self::XdpPrograms,
        Self::TcPrograms,
        Self::RingBuffer,
        Self::DevMapHash,
        Self::LpmTrie,
        Self::XdpAdjustHead,
        Self::XdpRedirectMap,
        Self::SkbAdjustRoom,
        Self::Redirect,
        Self::SkbSetTunnelKey,
        Self::GetHashRecalc,
        Self::SkbChangeTail,
        Self::SkcLookupTcp,
        Self::SkAssign,
        Self::SkRelease,
        Self::RingbufOutput,
        Self::XdpLink,
        Self::NativeXdp,
        Self::XdpMetadata,
        Self::RedirectPeer,
        Self::Tcx,
        Self::SkLookup,
        Self::TlsUlp,
    ];

    /// Found by attaching, not by loading a probe program.
    pub const fn probed_by_attaching(self) -> bool {
        matches!(self, Self::XdpLink | Self::Tcx | Self::NativeXdp)
    }

    /// Name in `veilctl status`, the metrics and `VEIL_TEST_DISABLE_FEATURES`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::XdpPrograms => "xdp-programs",
            Self::TcPrograms => "tc-programs",
            Self::RingBuffer => "ring-buffer",
            Self::DevMapHash => "devmap-hash",
            Self::LpmTrie => "lpm-trie",
            Self::XdpAdjustHead => "xdp-adjust-head",
            Self::XdpRedirectMap => "xdp-redirect-map",
            Self::SkbAdjustRoom => "skb-adjust-room",
            Self::Redirect => "redirect",
            Self::SkbSetTunnelKey => "skb-set-tunnel-key",
            Self::GetHashRecalc => "get-hash-recalc",
            Self::SkbChangeTail => "skb-change-tail",
            Self::SkcLookupTcp => "skc-lookup-tcp",
            Self::SkAssign => "sk-assign",
            Self::SkRelease => "sk-release",
            Self::RingbufOutput => "ringbuf-output",
            Self::XdpLink => "xdp-link",
            Self::NativeXdp => "xdp-native",
            Self::XdpMetadata => "xdp-metadata",
            Self::RedirectPeer => "redirect-peer",
            Self::Tcx => "tcx",
            Self::SkLookup => "sk-lookup",
            Self::TlsUlp => "tls-ulp",
        }
    }

    /// What it is, in kernel terms.
    pub const fn description(self) -> &'static str {
        match self {
            Self::XdpPrograms => "XDP programs",
            Self::TcPrograms => "TC (sched_cls) programs",
            Self::RingBuffer => "BPF ring buffer maps (the programs' log)",
            Self::DevMapHash => "hash device maps (XDP redirect targets)",
            Self::LpmTrie => "LPM trie maps (pod CIDR routes)",
            Self::XdpAdjustHead => "bpf_xdp_adjust_head in XDP (decapsulation)",
            Self::XdpRedirectMap => "bpf_redirect_map in XDP",
            Self::SkbAdjustRoom => "bpf_skb_adjust_room in TC (encapsulation)",
            Self::Redirect => "bpf_redirect in TC",
            Self::SkbSetTunnelKey => "bpf_skb_set_tunnel_key in TC (vxlan-device mode)",
            Self::GetHashRecalc => "bpf_get_hash_recalc in TC (VXLAN source ports)",
            Self::SkbChangeTail => "bpf_skb_change_tail in TC (ICMP fragmentation needed)",
            Self::SkcLookupTcp => "bpf_skc_lookup_tcp in TC (mesh steering)",
            Self::SkAssign => "bpf_sk_assign in TC (mesh steering)",
            Self::SkRelease => "bpf_sk_release in TC",
            Self::RingbufOutput => "bpf_ringbuf_output (the programs' log)",
            Self::XdpLink => "XDP attached through a bpf_link",
            Self::NativeXdp => "XDP in the underlay's driver (native mode)",
            Self::XdpMetadata => "bpf_xdp_adjust_meta in XDP (metadata delivery)",
            Self::RedirectPeer => "bpf_redirect_peer in TC (into a pod's namespace)",
            Self::Tcx => "tcx: TC programs attached through a bpf_link",
            Self::SkLookup => "sk_lookup programs with bpf_sk_assign",
            Self::TlsUlp => "the TLS ULP (kernel TLS)",
        }
    }

    /// The oldest upstream kernel that has it.
    pub const fn oldest_kernel(self) -> &'static str {
        match self {
            Self::XdpPrograms => "4.8",
            Self::TcPrograms => "4.1",
            Self::RingBuffer | Self::RingbufOutput => "5.8",
            Self::DevMapHash => "5.4",
            Self::LpmTrie => "4.11",
            Self::XdpAdjustHead => "4.10",
            Self::XdpRedirectMap => "4.14",
            Self::SkbAdjustRoom => "5.2",
            Self::Redirect => "4.4",
            Self::SkbSetTunnelKey => "4.3",
            Self::GetHashRecalc => "4.8",
            Self::SkbChangeTail => "4.9",
            Self::SkcLookupTcp => "5.2",
            Self::SkAssign => "5.7",
            Self::SkRelease => "4.20",
            Self::XdpLink => "5.9",
            Self::NativeXdp => "4.8 (and a driver that supports it; veth since 4.19)",
            Self::XdpMetadata => "4.15",
            Self::RedirectPeer => "5.10",
            Self::Tcx => "6.6",
            Self::SkLookup => "5.9",
            Self::TlsUlp => "5.1",
        }
    }

    /// What the agent does without it; `None` for a required feature.
    pub const fn fallback(self) -> Option<&'static str> {
        match self {
            Self::XdpMetadata => Some(
                "lookup delivery: TC finds a decapsulated packet's pod by its address \
                 (one hash lookup per packet on the underlay)",
            ),
            Self::RedirectPeer => Some(
                "bpf_redirect through the pod's veth pair (one more queue and softirq pass \
                 per packet)",
            ),
            Self::Tcx => Some("TC programs attached through netlink and a clsact qdisc"),
            Self::NativeXdp => Some(
                "generic XDP on the underlay: the program runs after the kernel has built an \
                 skb for the frame, which costs throughput",
            ),
            Self::SkLookup => Some(
                "no TIME_WAIT takeover: a meshed SYN that reuses a port of a connection \
                 still in TIME_WAIT waits for the client's retransmit (about a second)",
            ),
            Self::TlsUlp => Some(
                "mTLS records encrypted in userspace (rustls), every byte copied through \
                 the agent",
            ),
            _ => None,
        }
    }

    pub fn required(self) -> bool {
        self.fallback().is_none()
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// What probing found for one feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub feature: Feature,
    pub available: bool,
    /// Switched off by `VEIL_TEST_DISABLE_FEATURES` (then `available` is false).
    pub forced_off: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(
        "this kernel lacks {what} ({name}), which Veil's datapath needs; it is in Linux {oldest} \
         and later, and Veil supports Linux 6.1 (Debian 12) and later: run the agent on a \
         newer kernel"
    )]
    Missing {
        name: &'static str,
        what: &'static str,
        oldest: &'static str,
    },
    #[error(
        "{DISABLE_FEATURES_ENV} switches off {name}, which the datapath cannot do without: \
         only features with a fallback may be switched off"
    )]
    SwitchedOff { name: &'static str },
    #[error(
        "{DISABLE_FEATURES_ENV} names `{0}`, which is no feature the agent probes; known: {known}",
        known = Feature::ALL.map(Feature::name).join(", ")
    )]
    UnknownFeature(String),
    #[error(
        "cannot probe the kernel's BPF features ({probe}): {detail}; the agent needs root, or \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    Probe { probe: &'static str, detail: String },
}

/// The kernel's answers for every [`Feature`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`, for the record only: nothing is decided from it.
    pub release: String,
    /// In [`Feature::ALL`]'s order for those probed so far.
    pub probes: Vec<Probe>,
    /// What `VEIL_TEST_DISABLE_FEATURES` switched off.
    disabled: BTreeSet<Feature>,
}

impl KernelFeatures {
    /// Probes everything that needs no program of ours. The features found
    /// by attaching ([`Feature::probed_by_attaching`]) are added by
    /// [`Self::record`] once the datapath has tried them.
    pub fn probe(disabled: &BTreeSet<Feature>) -> Result<Self, FeatureError> {
        let mut features = Self {
            release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            probes: Vec::new(),
            disabled: disabled.clone(),
        };
        for feature in Feature::ALL {
            let available = match feature {
                _ if feature.probed_by_attaching() => continue,
                Feature::TlsUlp => veil_mtls::ktls::kernel_supports_tls(),
                _ => kernel_probe(feature)?,
            };
            features.record(feature, available);
        }
        Ok(features)
    }

    /// Records what the kernel answered for `feature` (a feature switched
    /// off stays off, whatever the kernel says).
    pub fn record(&mut self, feature: Feature, available: bool) {
        let forced_off = self.disabled.contains(&feature);
        let probe = Probe {
            feature,
            available: available && !forced_off,
            forced_off,
        };
        match self.probes.iter_mut().find(|p| p.feature == feature) {
            Some(existing) => *existing = probe,
            None => self.probes.push(probe),
        }
    }

    /// Whether a test switched `feature` off, whatever the kernel says.
    pub fn switched_off(&self, feature: Feature) -> bool {
        self.disabled.contains(&feature)
    }

    pub fn has(&self, feature: Feature) -> bool {
        self.probes
            .iter()
            .any(|p| p.feature == feature && p.available)
    }

    /// Fails on the first required feature the kernel lacks, of those
    /// probed so far.
    pub fn require_all(&self) -> Result<(), FeatureError> {
        match self
            .probes
            .iter()
            .find(|p| p.feature.required() && !p.available)
        {
            Some(missing) if missing.forced_off => Err(FeatureError::SwitchedOff {
                name: missing.feature.name(),
            }),
            Some(missing) => Err(missing_error(missing.feature)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl KernelFeatures {
    /// Every feature available except those in `disabled`, for unit tests.
    pub fn assumed(disabled: BTreeSet<Feature>) -> Self {
        let mut features = Self {
            release: "test".into(),
            probes: Vec::new(),
            disabled,
        };
        for feature in Feature::ALL {
            features.record(feature, true);
        }
        features
    }
}

pub fn missing_error(feature: Feature) -> FeatureError {
    FeatureError::Missing {
        name: feature.name(),
        what: feature.description(),
        oldest: feature.oldest_kernel(),
    }
}

/// The features `VEIL_TEST_DISABLE_FEATURES` names (none when unset).
pub fn disabled_by_environment() -> Result<BTreeSet<Feature>, FeatureError> {
    let Ok(list) = std::env::var(DISABLE_FEATURES_ENV) else {
        return Ok(BTreeSet::new());
    };
    parse_disabled(&list)
}

fn parse_disabled(list: &str) -> Result<BTreeSet<Feature>, FeatureError> {
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            Feature::from_name(name).ok_or_else(|| FeatureError::UnknownFeature(name.into()))
        })
        .collect()
}

/// One helper, program type or map type, asked of the kernel.
fn kernel_probe(feature: Feature) -> Result<bool, FeatureError> {
    let (program, helper) = match feature {
        Feature::XdpPrograms => return program_type(ProgramType::Xdp, "xdp"),
        Feature::TcPrograms => return program_type(ProgramType::SchedClassifier, "sched_cls"),
        Feature::SkLookup => {
            return Ok(program_type(ProgramType::SkLookup, "sk_lookup")?
                && helper_in(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign)?);
        }
        Feature::RingBuffer => return map_type(MapType::RingBuf, "ringbuf"),
        Feature::DevMapHash => return map_type(MapType::DevMapHash, "devmap_hash"),
        Feature::LpmTrie => return map_type(MapType::LpmTrie, "lpm_trie"),
        Feature::XdpAdjustHead => (ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_head),
        Feature::XdpRedirectMap => (ProgramType::Xdp, BpfHelper::BPF_FUNC_redirect_map),
        Feature::XdpMetadata => (ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta),
        Feature::SkbAdjustRoom => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skb_adjust_room,
        ),
        Feature::Redirect => (ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect),
        Feature::SkbSetTunnelKey => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skb_set_tunnel_key,
        ),
        Feature::GetHashRecalc => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_get_hash_recalc,
        ),
        Feature::SkbChangeTail => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skb_change_tail,
        ),
        Feature::SkcLookupTcp => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skc_lookup_tcp,
        ),
        Feature::SkAssign => (ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
        Feature::SkRelease => (ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_release),
        Feature::RingbufOutput => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_ringbuf_output,
        ),
        Feature::RedirectPeer => (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_redirect_peer,
        ),
        Feature::XdpLink | Feature::Tcx | Feature::NativeXdp | Feature::TlsUlp => {
            unreachable!("probed elsewhere")
        }
    };
    helper_in(program, helper)
}

fn helper_in(program: ProgramType, helper: BpfHelper) -> Result<bool, FeatureError> {
    is_helper_supported(program, helper).map_err(|e| FeatureError::Probe {
        probe: "helper",
        detail: format!("{helper:?} in {program:?}: {e}"),
    })
}

fn program_type(program: ProgramType, probe: &'static str) -> Result<bool, FeatureError> {
    is_program_supported(program).map_err(|e| FeatureError::Probe {
        probe,
        detail: e.to_string(),
    })
}

fn map_type(map: MapType, probe: &'static str) -> Result<bool, FeatureError> {
    is_map_supported(map).map_err(|e| FeatureError::Probe {
        probe,
        detail: e.to_string(),
    })
}

/// Whether XDP attaches through a bpf_link and TC through tcx here: the
/// object's do-nothing probe programs are attached to `lo` (in this network
/// namespace, generic XDP) and detached at once.
pub fn probe_attach_paths(ebpf: &mut aya::Ebpf) -> Result<(bool, bool), super::DatapathError> {
    use aya::programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc::TcAttachOptions,
    };
    use veil_common::names;

    let xdp: &mut Xdp = super::program_mut(ebpf, names::PROG_PROBE_XDP)?
        .try_into()
        .map_err(super::refused(names::PROG_PROBE_XDP))?;
    xdp.load().map_err(super::refused(names::PROG_PROBE_XDP))?;
    let xdp_link = match xdp.attach("lo", XdpMode::Skb) {
        // aya falls back to netlink by itself when bpf_link_create refuses;
        // only a link that is a bpf_link proves the path.
        Ok(id) => {
            let link = xdp
                .take_link(id)
                .map_err(super::refused(names::PROG_PROBE_XDP))?;
            FdLink::try_from(link).is_ok()
        }
        Err(_) => false,
    };
    let _ = xdp.unload();

    let tc: &mut SchedClassifier = super::program_mut(ebpf, names::PROG_PROBE_TC)?
        .try_into()
        .map_err(super::refused(names::PROG_PROBE_TC))?;
    tc.load().map_err(super::refused(names::PROG_PROBE_TC))?;
    let tcx = tc
        .attach_with_options(
            "lo",
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map(|id| tc.detach(id))
        .is_ok();
    let _ = tc.unload();
    Ok((xdp_link, tcx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, feature) in Feature::ALL.iter().enumerate() {
            assert_eq!(Feature::from_name(feature.name()), Some(*feature));
            assert!(
                Feature::ALL[i + 1..]
                    .iter()
                    .all(|f| f.name() != feature.name())
            );
        }
    }

    #[test]
    fn the_disable_list_names_features_and_refuses_unknown_ones() {
        assert_eq!(
            parse_disabled(" xdp-metadata, tcx ,").unwrap(),
            BTreeSet::from([Feature::XdpMetadata, Feature::Tcx])
        );
        assert!(parse_disabled("").unwrap().is_empty());
        let error = parse_disabled("xdp-metadata,bogus")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`bogus`") && error.contains("redirect-peer"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_required_feature_is_refused_with_its_name_and_kernel() {
        let mut features = KernelFeatures::assumed(BTreeSet::new());
        features.record(Feature::XdpMetadata, false);
        features
            .require_all()
            .expect("an optional feature may be missing");
        features.record(Feature::SkAssign, false);
        let error = features.require_all().unwrap_err().to_string();
        assert!(
            error.contains("bpf_sk_assign") && error.contains("sk-assign") && error.contains("5.7"),
            "{error}"
        );
    }

    #[test]
    fn a_feature_forced_off_stays_off_whatever_attaching_finds() {
        let mut features = KernelFeatures::assumed(BTreeSet::from([Feature::Tcx]));
        features.record(Feature::Tcx, true);
        assert!(!features.has(Feature::Tcx));
        assert!(features.switched_off(Feature::Tcx));
        assert!(features.has(Feature::XdpLink));
    }

    #[test]
    fn every_optional_feature_names_its_fallback() {
        let optional: Vec<_> = Feature::ALL.into_iter().filter(|f| !f.required()).collect();
        assert_eq!(
            optional,
            [
                Feature::NativeXdp,
                Feature::XdpMetadata,
                Feature::RedirectPeer,
                Feature::Tcx,
                Feature::SkLookup,
                Feature::TlsUlp
            ]
        );
    }
}
