//! Veil's cluster controller.
//!
//! Reconciles `ECDSACert` objects (`veil.dev/v1alpha1`): node agents write a
//! CSR for a workload identity (their keys never leave the node), the
//! controller checks it against the identity and signs it with the mesh's
//! local CA, and reports progress and the certificate chain in the status.
//! Replicas elect a leader with a Lease ([`lease`]); only the leader writes.

pub mod issuance;
pub mod lease;
pub mod reconcile;
