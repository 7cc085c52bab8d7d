//! The store's own settings: where Redis is (one node or a Cluster's seed nodes), how to
//! reach it over TLS, and the key prefix of the contract.

use crate::redact::Secret;
use std::path::PathBuf;

/// Where and how to reach Redis (`REDIS_*`, `KEY_PREFIX`).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: Secret,
    /// Seed nodes of a Redis Cluster; empty for a single node (`url`).
    pub cluster_nodes: Vec<Secret>,
    pub tls: RedisTlsFiles,
    pub key_prefix: String,
}

/// Files for a TLS connection to Redis (`rediss://`) beyond the system's trust store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedisTlsFiles {
    /// Certificate authorities to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS, both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl RedisTlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none()
    }
}
