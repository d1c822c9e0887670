//! Tenants and their API keys: a file of `TENANT SHA256_HEX_OF_KEY` lines.
//! Only digests of keys are stored; a request's `Authorization: Bearer KEY`
//! is hashed and looked up.

use std::collections::HashMap;
use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Why a tenants file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

/// Key digest (lowercase hex) → tenant name.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    by_digest: HashMap<[u8; 32], String>,
}

/// Tenant names become parts of object keys and Redis keys: keep them tame.
pub fn is_valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

impl Tenants {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TenantsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses the file's text: one `TENANT SHA256_HEX` per line, `#`
    /// comments and blank lines allowed.
    pub fn parse(text: &str) -> Result<Self, TenantsError> {
        let mut tenants = Tenants::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let err = |message: String| TenantsError::Line { line, message };
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, digest] = fields[..] else {
                return Err(err(format!(
                    "expected 'TENANT SHA256_HEX_OF_KEY', found {} fields",
                    fields.len()
                )));
            };
            if !is_valid_tenant(name) {
                return Err(err(format!(
                    "invalid tenant name '{name}' (letters, digits, '-', '_', '.'; at most 64)"
                )));
            }
            let mut bytes = [0u8; 32];
            if digest.len() != 64 || hex::decode_to_slice(digest, &mut bytes).is_err() {
                return Err(err(format!(
                    "'{digest}' is not a SHA-256 digest (64 hex digits)"
                )));
            }
            if tenants.by_digest.insert(bytes, name.to_string()).is_some() {
                return Err(err("the same key digest appears twice".into()));
            }
        }
        Ok(tenants)
    }

    /// Adds a tenant's key digest (tests and embedded setups).
    pub fn insert(&mut self, tenant: &str, sha_hex: &str) -> Result<(), TenantsError> {
        let extra = Tenants::parse(&format!("{tenant} {sha_hex}"))?;
        self.by_digest.extend(extra.by_digest);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The tenant whose key is `key`. Scans every entry with a
    /// constant-time comparison, so timing tells nothing about digests.
    pub fn authenticate(&self, key: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (d, name) in &self.by_digest {
            let diff = d
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// A new random API key and the SHA-256 (hex) to put in the tenants file.
pub fn new_api_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("dig_{}", hex::encode(bytes));
    let sha = hex::encode(Sha256::digest(key.as_bytes()));
    (key, sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_authenticates() {
        let (key, sha) = new_api_key();
        let text = format!("# tenants\n\nlab {sha}  # the lab\n");
        let t = Tenants::parse(&text).unwrap();
        assert_eq!(t.authenticate(&key), Some("lab"));
        assert_eq!(t.authenticate("nope"), None);
    }

    #[test]
    fn bad_lines_name_their_number() {
        let err = Tenants::parse("# c\nlab\n").unwrap_err().to_string();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = Tenants::parse("a/b 00\n").unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("tenant name"),
            "{err}"
        );
        let err = Tenants::parse(&format!("lab {}\n", "z".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a SHA-256"), "{err}");
    }
}
