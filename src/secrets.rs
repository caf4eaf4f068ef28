//! Pure: upstream credentials sealed at rest. A master key is 32 bytes written as 64 hex digits;
//! its id is the first 8 hex digits of a SHA-256 over it (names the key, reveals nothing
//! usable). A sealed value is the text `enc:v1:<key-id>:<base64(nonce || ciphertext)>`:
//! XChaCha20-Poly1305 with a random 24-byte nonce per value, so a wrong key or a changed byte
//! fails to open instead of giving garbage. Anything without the `enc:v1:` prefix is a plaintext
//! value written before encryption (recognised, so it can be sealed in place).

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// What every sealed value starts with (format version 1).
pub const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a master key is 64 hex digits (32 bytes, e.g. `openssl rand -hex 32`); {0}")]
    BadKey(String),
    #[error("a credential is sealed under master key id {found}, but the key given has id {have}")]
    UnknownKey { found: String, have: String },
    #[error("a credential sealed under master key id {0} does not open: wrong key or tampered")]
    DoesNotOpen(String),
    #[error("a credential starts with {PREFIX} but is not a sealed value: {0}")]
    Malformed(&'static str),
    #[error("a credential too long to seal")]
    TooLong,
    #[error("no random numbers from the system: {0}")]
    Random(String),
}

/// A master key and its id. `Debug` shows the id only.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; KEY_LEN],
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    fn from_bytes(key: [u8; KEY_LEN]) -> MasterKey {
        let digest = Sha256::new()
            .chain_update(b"tollgate master key id\0")
            .chain_update(key)
            .finalize();
        MasterKey {
            key,
            id: hex::encode(&digest[..4]),
        }
    }

    /// 64 hex digits (either case), surrounding whitespace (a key file's newline) ignored.
    pub fn parse(text: &str) -> Result<MasterKey, SecretError> {
        let text = text.trim();
        if text.len() != 2 * KEY_LEN {
            return Err(SecretError::BadKey(format!(
                "this one has {} characters",
                text.chars().count()
            )));
        }
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(text, &mut key)
            .map_err(|_| SecretError::BadKey("this one has a non-hex character".into()))?;
        Ok(MasterKey::from_bytes(key))
    }

    /// A new random key.
    pub fn generate() -> Result<MasterKey, SecretError> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(MasterKey::from_bytes(key))
    }

    /// The key's text form (what a key file holds).
    pub fn to_hex(&self) -> String {
        hex::encode(self.key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.key.into())
    }
}

/// A stored credential as read: plaintext from before encryption, or sealed under a key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored<'a> {
    Plain(&'a str),
    Sealed { key_id: &'a str, payload: &'a str },
}

impl<'a> Stored<'a> {
    pub fn of(text: &'a str) -> Result<Stored<'a>, SecretError> {
        let Some(rest) = text.strip_prefix(PREFIX) else {
            return Ok(Stored::Plain(text));
        };
        let (key_id, payload) = rest
            .split_once(':')
            .ok_or(SecretError::Malformed("no key id"))?;
        if key_id.len() != 8 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SecretError::Malformed("the key id is not 8 hex digits"));
        }
        Ok(Stored::Sealed { key_id, payload })
    }
}

/// The current master key (seals) and older ones (only open, until rotated away).
#[derive(Debug, Clone)]
pub struct Keyring {
    current: MasterKey,
    old: Vec<MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey, old: Vec<MasterKey>) -> Keyring {
        Keyring { current, old }
    }

    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// Seals `plaintext` under the current key with a fresh random nonce.
    pub fn seal(&self, plaintext: &str) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SecretError::Random(e.to_string()))?;
        self.seal_with(plaintext, nonce)
    }

    fn seal_with(&self, plaintext: &str, nonce: [u8; NONCE_LEN]) -> Result<String, SecretError> {
        let sealed = self
            .current
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), plaintext.as_bytes())
            .map_err(|_| SecretError::TooLong)?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Ok(format!(
            "{PREFIX}{}:{}",
            self.current.id,
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ))
    }

    /// The plaintext of a stored value: sealed ones opened with the key their id names, plaintext
    /// ones as they are.
    pub fn open(&self, stored: &str) -> Result<String, SecretError> {
        let (key_id, payload) = match Stored::of(stored)? {
            Stored::Plain(p) => return Ok(p.to_string()),
            Stored::Sealed { key_id, payload } => (key_id, payload),
        };
        let key = std::iter::once(&self.current)
            .chain(&self.old)
            .find(|k| k.id.eq_ignore_ascii_case(key_id))
            .ok_or_else(|| SecretError::UnknownKey {
                found: key_id.to_string(),
                have: self.current.id.clone(),
            })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|_| SecretError::Malformed("not base64"))?;
        if bytes.len() < NONCE_LEN + 16 {
            return Err(SecretError::Malformed("too short"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = key
            .cipher()
            .decrypt(XNonce::from_slice(nonce), sealed)
            .map_err(|_| SecretError::DoesNotOpen(key.id.clone()))?;
        String::from_utf8(plain).map_err(|_| SecretError::DoesNotOpen(key.id.clone()))
    }

    /// `stored` sealed under the current key: opened first (plaintext or an older key), then
    /// sealed again; `None` when it already is sealed under the current key (nothing to do).
    pub fn reseal(&self, stored: &str) -> Result<Option<String>, SecretError> {
        if let Stored::Sealed { key_id, .. } = Stored::of(stored)? {
            if key_id.eq_ignore_ascii_case(&self.current.id) {
                self.open(stored)?;
                return Ok(None);
            }
        }
        let plain = self.open(stored)?;
        self.seal(&plain).map(Some)
    }
}

/// The secret field of an account's `credentials` JSON (`header` and others are not secret).
pub const SECRET_FIELD: &str = "api_key";

/// Plaintext `credentials` (from an operator: never read as sealed, whatever they look like)
/// with the secret field sealed under the current key.
pub fn seal_credentials(
    keys: &Keyring,
    credentials: &serde_json::Value,
) -> Result<serde_json::Value, SecretError> {
    map_secret(credentials, |v| keys.seal(v))
}

/// `credentials` with its secret field opened (for the in-memory account set only).
pub fn open_credentials(
    keys: &Keyring,
    credentials: &serde_json::Value,
) -> Result<serde_json::Value, SecretError> {
    map_secret(credentials, |v| keys.open(v))
}

/// `credentials` sealed under the current key, or `None` when that is already so.
pub fn reseal_credentials(
    keys: &Keyring,
    credentials: &serde_json::Value,
) -> Result<Option<serde_json::Value>, SecretError> {
    let Some(v) = credentials.get(SECRET_FIELD).and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    Ok(keys.reseal(v)?.map(|sealed| {
        let mut c = credentials.clone();
        c[SECRET_FIELD] = serde_json::Value::String(sealed);
        c
    }))
}

/// Whether `credentials` hold their secret in plaintext (written before encryption).
pub fn is_plaintext(credentials: &serde_json::Value) -> bool {
    credentials
        .get(SECRET_FIELD)
        .and_then(|v| v.as_str())
        .is_some_and(|v| matches!(Stored::of(v), Ok(Stored::Plain(_))))
}

fn map_secret(
    credentials: &serde_json::Value,
    f: impl FnOnce(&str) -> Result<String, SecretError>,
) -> Result<serde_json::Value, SecretError> {
    let mut c = credentials.clone();
    if let Some(v) = credentials.get(SECRET_FIELD).and_then(|v| v.as_str()) {
        c[SECRET_FIELD] = serde_json::Value::String(f(v)?);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn ring(current: &str, old: &[&str]) -> Keyring {
        Keyring::new(
            MasterKey::parse(current).unwrap(),
            old.iter().map(|k| MasterKey::parse(k).unwrap()).collect(),
        )
    }

    #[test]
    fn master_keys() {
        for (text, expected) in [
            (A, Ok(())),
            (&format!("  {}\n", A.to_uppercase()), Ok(())),
            ("", Err("this one has 0 characters")),
            (&A[..62], Err("this one has 62 characters")),
            (&format!("{A}00"), Err("this one has 66 characters")),
            (
                &format!("{}zz", &A[..62]),
                Err("this one has a non-hex character"),
            ),
        ] {
            let got = MasterKey::parse(text)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let expected = expected.map_err(|m| {
                format!(
                    "a master key is 64 hex digits (32 bytes, e.g. `openssl rand -hex 32`); {m}"
                )
            });
            assert_eq!(got, expected, "{text:?}");
        }
        let a = MasterKey::parse(A).unwrap();
        assert_eq!(a.id(), MasterKey::parse(&A.to_uppercase()).unwrap().id());
        assert_ne!(a.id(), MasterKey::parse(B).unwrap().id());
        assert_eq!(a.id().len(), 8);
        assert_eq!(a.to_hex(), A);
        assert_eq!(
            format!("{a:?}"),
            format!("MasterKey({})", a.id()),
            "Debug never shows the key"
        );
        let g = MasterKey::generate().unwrap();
        assert_eq!(MasterKey::parse(&g.to_hex()).unwrap().id(), g.id());
    }

    #[test]
    fn sealed_values() {
        let a = ring(A, &[]);
        let sealed = a.seal("sk-secret").unwrap();
        let id = a.current().id().to_string();
        assert!(sealed.starts_with(&format!("enc:v1:{id}:")), "{sealed}");
        assert!(!sealed.contains("sk-secret"));
        assert_ne!(
            sealed,
            a.seal("sk-secret").unwrap(),
            "a fresh nonce each time"
        );
        // One byte changed inside the base64 payload (past the nonce).
        let tampered = {
            let (head, payload) = sealed.rsplit_once(':').unwrap();
            let mut bytes = base64::engine::general_purpose::STANDARD
                .decode(payload)
                .unwrap();
            bytes[NONCE_LEN] ^= 1;
            format!(
                "{head}:{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            )
        };
        let b_id = MasterKey::parse(B).unwrap().id().to_string();
        // The same id but another key: what a forged or corrupted id would meet.
        let wrong_under_same_id = ring(B, &[])
            .seal("sk-secret")
            .unwrap()
            .replacen(&b_id, &id, 1);
        for (keys, stored, expected) in [
            (ring(A, &[]), sealed.clone(), Ok("sk-secret".to_string())),
            (ring(B, &[A]), sealed.clone(), Ok("sk-secret".to_string())),
            (ring(A, &[]), "sk-legacy".into(), Ok("sk-legacy".into())),
            (ring(A, &[]), "".into(), Ok("".into())),
            (
                ring(A, &[]),
                "${OPENAI_API_KEY}".into(),
                Ok("${OPENAI_API_KEY}".into()),
            ),
            (
                ring(B, &[]),
                sealed.clone(),
                Err(SecretError::UnknownKey {
                    found: id.clone(),
                    have: b_id.clone(),
                }),
            ),
            (
                ring(A, &[]),
                tampered,
                Err(SecretError::DoesNotOpen(id.clone())),
            ),
            (
                ring(A, &[]),
                wrong_under_same_id,
                Err(SecretError::DoesNotOpen(id.clone())),
            ),
            (
                ring(A, &[]),
                format!("enc:v1:{id}:not base64!"),
                Err(SecretError::Malformed("not base64")),
            ),
            (
                ring(A, &[]),
                format!("enc:v1:{id}:AAAA"),
                Err(SecretError::Malformed("too short")),
            ),
            (
                ring(A, &[]),
                "enc:v1:abc".into(),
                Err(SecretError::Malformed("no key id")),
            ),
            (
                ring(A, &[]),
                "enc:v1:xyz:AAAA".into(),
                Err(SecretError::Malformed("the key id is not 8 hex digits")),
            ),
        ] {
            assert_eq!(keys.open(&stored), expected, "{stored:?}");
        }
    }

    #[test]
    fn deterministic_with_a_given_nonce() {
        let a = ring(A, &[]);
        let one = a.seal_with("sk", [7; NONCE_LEN]).unwrap();
        assert_eq!(one, a.seal_with("sk", [7; NONCE_LEN]).unwrap());
        assert_eq!(a.open(&one).unwrap(), "sk");
    }

    #[test]
    fn credentials_json() {
        let a = ring(A, &[]);
        let plain = serde_json::json!({ "api_key": "sk-1", "header": "x-api-key" });
        let sealed = seal_credentials(&a, &plain).unwrap();
        assert_eq!(sealed["header"], "x-api-key", "only the secret is sealed");
        assert!(!sealed.to_string().contains("sk-1"));
        let looks_sealed = serde_json::json!({ "api_key": sealed["api_key"] });
        assert_eq!(
            open_credentials(&a, &seal_credentials(&a, &looks_sealed).unwrap()).unwrap(),
            looks_sealed,
            "an operator's value is plaintext, whatever it looks like"
        );
        assert_eq!(open_credentials(&a, &sealed).unwrap(), plain);
        assert_eq!(
            open_credentials(&a, &plain).unwrap(),
            plain,
            "legacy plaintext"
        );
        assert_eq!(reseal_credentials(&a, &sealed).unwrap(), None);
        assert!(is_plaintext(&plain));
        assert!(!is_plaintext(&sealed));
        assert!(!is_plaintext(&serde_json::json!({})));
        let resealed = reseal_credentials(&a, &plain).unwrap().unwrap();
        assert_eq!(open_credentials(&a, &resealed).unwrap(), plain);
        // Rotation: B current, A old; afterwards A alone cannot open it, B alone can.
        let rotated = reseal_credentials(&ring(B, &[A]), &sealed)
            .unwrap()
            .unwrap();
        assert_eq!(open_credentials(&ring(B, &[]), &rotated).unwrap(), plain);
        assert!(open_credentials(&a, &rotated).is_err());
        let empty = serde_json::json!({});
        assert_eq!(seal_credentials(&a, &empty).unwrap(), empty);
        assert_eq!(reseal_credentials(&a, &empty).unwrap(), None);
    }
}
