//! The datapath this kernel gets: each decision taken from the probes in
//! [`super::features`], with its reason, for the start-up log, `veilctl
//! status` and the metrics.
//!
//! Decisions that shape the programs themselves become load-time constants
//! ([`LoadTimeSettings`], see `veil_common::load_time`); the others choose
//! how programs are attached or what the agent runs beside them.

use aya::{Ebpf, EbpfError, EbpfLoader};
use veil_api::DatapathChoice;
use veil_common::load_time::{
    DELIVERY_LOOKUP, DELIVERY_METADATA, GLOBAL_DELIVERY, GLOBAL_REDIRECT_PEER,
};

use super::features::{DISABLE_FEATURES_ENV, Feature, KernelFeatures};

/// How decapsulated frames reach their pod (see the eBPF `delivery` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// XDP tags frames in their metadata area.
    Metadata,
    /// TC finds the pod by the inner destination.
    Lookup,
}

impl Delivery {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Metadata => "metadata",
            Self::Lookup => "lookup",
        }
    }
}

/// What the programs are built for, written into `.rodata` before load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadTimeSettings {
    pub delivery: Delivery,
    /// `bpf_redirect_peer` into a pod's namespace, else `bpf_redirect`
    /// through its veth pair.
    pub redirect_peer: bool,
}

impl LoadTimeSettings {
    /// The best the kernel supports.
    pub fn for_kernel(kernel: &KernelFeatures) -> Self {
        Self {
            delivery: if kernel.has(Feature::XdpMetadata) {
                Delivery::Metadata
            } else {
                Delivery::Lookup
            },
            redirect_peer: kernel.has(Feature::RedirectPeer),
        }
    }

    /// Creates `object`'s maps and prepares its programs with these settings
    /// (nothing is verified until a program is loaded).
    pub fn load(&self, object: &[u8]) -> Result<Ebpf, EbpfError> {
        let delivery = match self.delivery {
            Delivery::Metadata => DELIVERY_METADATA,
            Delivery::Lookup => DELIVERY_LOOKUP,
        };
        let redirect_peer = u32::from(self.redirect_peer);
        EbpfLoader::new()
            .override_global(GLOBAL_DELIVERY, &delivery, true)
            .override_global(GLOBAL_REDIRECT_PEER, &redirect_peer, true)
            .load(object)
    }
}

/// The decisions that follow from the kernel, with their reasons.
pub fn report(
    kernel: &KernelFeatures,
    settings: &LoadTimeSettings,
    xdp_mode: &str,
    xdp_reason: &str,
    kernel_tls: Option<bool>,
    kernel_tls_off_in_config: bool,
) -> Vec<DatapathChoice> {
    let mut choices = vec![
        decide(
            kernel,
            "delivery",
            Feature::XdpMetadata,
            settings.delivery.name(),
            settings.delivery == Delivery::Metadata,
        ),
        decide(
            kernel,
            "pod-entry",
            Feature::RedirectPeer,
            if settings.redirect_peer {
                "redirect-peer"
            } else {
                "veth"
            },
            settings.redirect_peer,
        ),
        decide(
            kernel,
            "tc-attach",
            Feature::Tcx,
            if kernel.has(Feature::Tcx) {
                "tcx"
            } else {
                "netlink"
            },
            kernel.has(Feature::Tcx),
        ),
        DatapathChoice {
            decision: "xdp-attach".into(),
            chosen: xdp_mode.into(),
            reason: xdp_reason.into(),
            fallback: xdp_mode != "native",
        },
        decide(
            kernel,
            "time-wait-takeover",
            Feature::SkLookup,
            if kernel.has(Feature::SkLookup) {
                "sk-lookup"
            } else {
                "none"
            },
            kernel.has(Feature::SkLookup),
        ),
    ];
    if let Some(kernel_tls) = kernel_tls {
        let mut choice = decide(
            kernel,
            "mtls-records",
            Feature::TlsUlp,
            if kernel_tls { "ktls" } else { "userspace" },
            kernel_tls,
        );
        if kernel_tls_off_in_config && kernel.has(Feature::TlsUlp) {
            choice.reason = "kernel_tls = \"off\" in the agent config ([mesh])".into();
        }
        choices.push(choice);
    }
    choices
}

/// A decision that hangs on one feature: the preferred way when the kernel
/// has it, its fallback otherwise, saying why.
fn decide(
    kernel: &KernelFeatures,
    decision: &str,
    feature: Feature,
    chosen: &str,
    preferred: bool,
) -> DatapathChoice {
    let reason = if preferred {
        format!("the kernel has {}", feature.description())
    } else if kernel.switched_off(feature) {
        format!("{} switched off by {DISABLE_FEATURES_ENV}", feature.name())
    } else {
        format!("the kernel lacks {}", feature.description())
    };
    DatapathChoice {
        decision: decision.into(),
        chosen: chosen.into(),
        reason,
        fallback: !preferred,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_best_supported_settings_are_chosen() {
        let all = KernelFeatures::assumed(BTreeSet::new());
        assert_eq!(
            LoadTimeSettings::for_kernel(&all),
            LoadTimeSettings {
                delivery: Delivery::Metadata,
                redirect_peer: true
            }
        );
        let lacking = KernelFeatures::assumed(BTreeSet::from([
            Feature::XdpMetadata,
            Feature::RedirectPeer,
        ]));
        assert_eq!(
            LoadTimeSettings::for_kernel(&lacking),
            LoadTimeSettings {
                delivery: Delivery::Lookup,
                redirect_peer: false
            }
        );
    }

    #[test]
    fn each_fallback_is_reported_with_its_reason() {
        let mut kernel = KernelFeatures::assumed(BTreeSet::from([Feature::Tcx]));
        kernel.record(Feature::XdpMetadata, false);
        let settings = LoadTimeSettings::for_kernel(&kernel);
        let choices = report(
            &kernel,
            &settings,
            "generic",
            "native refused",
            Some(false),
            true,
        );
        let find = |d: &str| choices.iter().find(|c| c.decision == d).unwrap();
        assert_eq!(find("delivery").chosen, "lookup");
        assert!(find("delivery").fallback);
        assert!(
            find("delivery")
                .reason
                .contains("lacks bpf_xdp_adjust_meta"),
            "{:?}",
            find("delivery")
        );
        assert_eq!(find("tc-attach").chosen, "netlink");
        assert!(find("tc-attach").reason.contains(DISABLE_FEATURES_ENV));
        assert_eq!(find("pod-entry").chosen, "redirect-peer");
        assert!(!find("pod-entry").fallback);
        assert!(find("xdp-attach").fallback);
        assert_eq!(find("mtls-records").chosen, "userspace");
        assert!(find("mtls-records").reason.contains("kernel_tls"));
    }
}
