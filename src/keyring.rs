//! The master key that seals upstream credentials at rest (`secrets.rs` does the crypto): where it
//! comes from (`TOLLGATE_MASTER_KEY`, else `[database] master_key_file`, else the default file,
//! created mode 0600 on first start), the check at start that it opens every stored credential
//! (a wrong key fails the start with one line), the in-place sealing of credentials written
//! before encryption, and `tollgate accounts rotate-encryption` (both audited as `keyring.*`,
//! target the current key's id). Never logs a key, only its id.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::secrets::{self, Keyring, MasterKey, SecretError, Stored};
use crate::settings;
use crate::store::{Actor, Store, StoreError, Target};

/// The master key itself, as 64 hex digits; wins over any key file.
pub const MASTER_KEY_ENV: &str = "TOLLGATE_MASTER_KEY";
/// `accounts rotate-encryption`: the key the credentials are sealed with now (64 hex digits).
pub const OLD_MASTER_KEY_ENV: &str = "TOLLGATE_OLD_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{var}: {error}")]
    Env {
        var: &'static str,
        error: SecretError,
    },
    #[error("master key file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("the upstream credentials in the database are sealed under master key id {found}, but there is no master key: set {MASTER_KEY_ENV} or [database] master_key_file, or put the key file back at {}", path.display())]
    Missing { found: String, path: PathBuf },
    #[error("the master key (id {have}, from {from}) does not open the upstream credentials in the database ({error}); give the key they were sealed with, or rotate with `tollgate accounts rotate-encryption`")]
    Wrong {
        have: String,
        from: String,
        error: SecretError,
    },
    #[error("rotate-encryption needs the key the credentials are sealed with now: --old-key-file PATH or {OLD_MASTER_KEY_ENV}")]
    NoOldKey,
    #[error("{0}")]
    Seal(SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the current key came from, for messages.
#[derive(Debug, Clone)]
enum Source {
    Env,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Env => f.write_str(MASTER_KEY_ENV),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Opens the credentials for this process: finds (or, zero-setup, creates) the master key,
/// checks that it opens every stored credential, and seals in place any written before
/// encryption (once; a second run finds nothing to do), audited as `keyring.seal_plaintext`.
pub async fn unlock(
    store: &Store,
    db: &settings::Database,
    actor: &Actor,
) -> Result<Keyring, KeyringError> {
    let stored = store.all_credentials().await?;
    let sealed_under = stored.iter().find_map(|(_, c)| sealed_key_id(c));
    let (key, from) = current_key(db, sealed_under.as_deref())?;
    let keys = Keyring::new(key, Vec::new());
    for (_, c) in &stored {
        secrets::open_credentials(&keys, c).map_err(|error| KeyringError::Wrong {
            have: keys.current().id().to_string(),
            from: from.to_string(),
            error,
        })?;
    }
    if !stored.iter().any(|(_, c)| secrets::is_plaintext(c)) {
        // Nothing to seal: no write transaction (no row locks) at all.
        return Ok(keys);
    }
    let mut tx = store.begin().await?;
    let sealed = tx
        .rewrite_credentials(|c| {
            secrets::reseal_credentials(&keys, c).map_err(|error| KeyringError::Wrong {
                have: keys.current().id().to_string(),
                from: from.to_string(),
                error,
            })
        })
        .await?;
    if sealed > 0 {
        let target = Target::new("keyring", keys.current().id());
        let after = serde_json::json!({ "key_id": keys.current().id(), "sealed": sealed });
        tx.audit(actor, "keyring.seal_plaintext", &target, None, Some(after))
            .await?;
        tx.commit().await?;
        if !store.scrub().await? {
            tracing::warn!("the SQLite WAL could not be emptied: old copies of the plaintext credentials stay in it until the next checkpoint");
        }
        tracing::info!(
            accounts = sealed,
            key_id = keys.current().id(),
            "upstream credentials stored in plaintext (written before encryption) are now sealed"
        );
    }
    Ok(keys)
}

/// `tollgate accounts rotate-encryption`: every credential opened with an old key (or the current
/// one, or as plaintext) and sealed under the current key, in one transaction; on any error
/// nothing is written. Returns how many were re-sealed.
pub async fn rotate(
    store: &Store,
    db: &settings::Database,
    old_key_files: &[PathBuf],
    actor: &Actor,
) -> Result<(usize, String), KeyringError> {
    let mut old = Vec::new();
    if let Some(text) = env_key(OLD_MASTER_KEY_ENV) {
        old.push(MasterKey::parse(&text).map_err(|error| KeyringError::Env {
            var: OLD_MASTER_KEY_ENV,
            error,
        })?);
    }
    for path in old_key_files {
        old.push(read_key_file(path)?);
    }
    if old.is_empty() {
        return Err(KeyringError::NoOldKey);
    }
    // The new key may be created here: the old one opens what is stored.
    let (key, from) = current_key(db, None)?;
    let keys = Keyring::new(key, old);
    let id = keys.current().id().to_string();
    // The key ids the credentials were sealed under ("plaintext" for those never sealed).
    let was = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut tx = store.begin().await?;
    let n = tx
        .rewrite_credentials(|c| {
            if let Ok(mut was) = was.lock() {
                was.insert(sealed_key_id(c).unwrap_or_else(|| "plaintext".into()));
            }
            secrets::reseal_credentials(&keys, c).map_err(|error| KeyringError::Wrong {
                have: id.clone(),
                from: format!("{from} or the old keys given"),
                error,
            })
        })
        .await?;
    let was: Vec<String> = was
        .into_inner()
        .map(|w| w.into_iter().collect())
        .unwrap_or_default();
    tx.audit(
        actor,
        "keyring.rotate",
        &Target::new("keyring", &id),
        Some(serde_json::json!({ "key_ids": was })),
        Some(serde_json::json!({ "key_id": id, "resealed": n })),
    )
    .await?;
    tx.commit().await?;
    Ok((n, id))
}

fn sealed_key_id(credentials: &serde_json::Value) -> Option<String> {
    let v = credentials.get(secrets::SECRET_FIELD)?.as_str()?;
    match Stored::of(v) {
        Ok(Stored::Sealed { key_id, .. }) => Some(key_id.to_string()),
        _ => None,
    }
}

fn env_key(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// The current key: the environment, the configured file, or the default file. The default file
/// is created when missing, unless the database already holds credentials sealed under some
/// key (`sealed_under`): a new key could not open them, so that is an error naming the file.
fn current_key(
    db: &settings::Database,
    sealed_under: Option<&str>,
) -> Result<(MasterKey, Source), KeyringError> {
    if let Some(text) = env_key(MASTER_KEY_ENV) {
        let key = MasterKey::parse(&text).map_err(|error| KeyringError::Env {
            var: MASTER_KEY_ENV,
            error,
        })?;
        return Ok((key, Source::Env));
    }
    let path = &db.master_key_file;
    let from = Source::File(path.clone());
    if db.master_key_file_explicit || path.exists() {
        return Ok((read_key_file(path)?, from));
    }
    if let Some(found) = sealed_under {
        return Err(KeyringError::Missing {
            found: found.to_string(),
            path: path.clone(),
        });
    }
    Ok((create_key_file(path)?, from))
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> KeyringError {
    KeyringError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_key_file(path: &Path) -> Result<MasterKey, KeyringError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let key = MasterKey::parse(&text).map_err(|e| file_error(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "the master key file is readable by others than its owner: chmod 600 it");
            }
        }
    }
    Ok(key)
}

/// A new key in a new file, mode 0600. Written and synced under a temporary name, then linked
/// into place (atomic, fails if the file exists), so another process never reads half a key: one
/// creating it at the same moment wins and its key is read instead.
fn create_key_file(path: &Path) -> Result<MasterKey, KeyringError> {
    let key = MasterKey::generate().map_err(KeyringError::Seal)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let cannot = |e: std::io::Error| {
        file_error(
            path,
            format_args!(
                "cannot create it ({e}); set {MASTER_KEY_ENV} or [database] master_key_file"
            ),
        )
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(format!("{}\n", key.to_hex()).as_bytes())?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key_file(path),
        Err(e) => return Err(cannot(e)),
    }
    tracing::info!(
        file = %path.display(),
        key_id = key.id(),
        "created the master key file that seals upstream credentials; keep it (and back it up): without it they cannot be read"
    );
    Ok(key)
}
