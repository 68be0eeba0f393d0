//! Sandcastle: a Kubernetes operator that runs AI coding agents in E2B-compatible sandboxes.

#![deny(unsafe_code)]

pub mod crd;
pub mod localcluster;
