//! The node's identity: one ed25519 key under `$DEALLEDGER_HOME`, created on first use with
//! mode 0600. It signs journal checkpoints (and is the node's libp2p identity).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// The key file's name inside the home directory.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by others: the key may have leaked; fix the mode or replace it.
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    /// The file does not hold 64 hex characters.
    #[error("{path} does not hold a 32-byte hex key")]
    Malformed { path: PathBuf },
}

/// Loads the key under `home`, creating it (mode 0600) on first use.
pub fn load_or_create(home: &Path) -> Result<SigningKey, IdentityError> {
    let path = home.join(KEY_FILE);
    let io = |source| IdentityError::Io { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::TooOpen { path, mode });
            }
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| IdentityError::Malformed { path: path.clone() })?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(home).map_err(io)?;
            let key = SigningKey::generate(&mut rand::rng());
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            file.write_all(hex::encode(key.to_bytes()).as_bytes()).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_key_once_and_loads_it_again() {
        let home = std::env::temp_dir().join(format!("dealledger-id-{}", uuid::Uuid::new_v4()));
        let first = load_or_create(&home).unwrap();
        let mode = std::fs::metadata(home.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&home).unwrap().to_bytes(), first.to_bytes());
        std::fs::set_permissions(home.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(matches!(load_or_create(&home), Err(IdentityError::TooOpen { .. })));
        std::fs::remove_dir_all(home).unwrap();
    }
}
