//! Veil's cluster controller.
//!
//! Reconciles `ECDSACert` objects (`veil.dev/v1alpha1`): node agents write a
//! CSR for a workload identity (their keys never leave the node), the
//! controller checks it against the identity, signs it with the mesh's local
//! CA only for a node that runs a meshed pod of that identity
//! ([`placement`]), and reports progress and the certificate chain in the
//! status.
//! Replicas elect a leader with a Lease ([`lease`]); only the leader writes.
//! With a Kafka broker configured, the leader also publishes pod lifecycle
//! events derived from the API server ([`pod_events`]), which is how each
//! agent learns the pods of the other nodes.

pub mod issuance;
pub mod lease;
pub mod placement;
pub mod pod_events;
pub mod policy_events;
pub mod reconcile;
