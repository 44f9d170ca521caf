//! Identity: who is calling. Bearer JWTs are checked against configured keys
//! only; local users log in with a password through the Flight handshake and
//! receive a token minted here.

mod jwt;
mod password;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use jwt::TokenVerifier;
pub use password::hash_password;

use crate::config::{AuthConfig, LocalUser};

/// The caller of a request, as established by a verified token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerIdentity {
    pub user: String,
    pub groups: Vec<String>,
    pub attributes: BTreeMap<String, String>,
}

impl CallerIdentity {
    /// Group membership is exact and case-sensitive.
    pub fn has_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// Why a caller could not be identified. The text is safe to show the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "no credentials: send `authorization: Bearer <token>` (or log in with Basic credentials through Handshake)"
    )]
    MissingCredentials,
    #[error("malformed authorization header: {0}")]
    MalformedHeader(String),
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("invalid username or password")]
    BadPassword,
    #[error("cannot mint a token: {0}")]
    Minting(String),
    #[error("cannot load keys: {0}")]
    Keys(String),
}

/// Authenticates callers for every front end. Keys and users are replaced
/// as a whole by [`Authenticator::reload`]; a call in progress keeps the set
/// it started with.
#[derive(Debug)]
pub struct Authenticator {
    current: parking_lot::RwLock<Arc<Credentials>>,
}

/// The keys and local users of one config.
#[derive(Debug)]
struct Credentials {
    verifier: TokenVerifier,
    users: BTreeMap<String, LocalUser>,
}

impl Credentials {
    fn new(config: &AuthConfig, previous: Option<&TokenVerifier>) -> Result<Self, AuthError> {
        Ok(Self {
            verifier: TokenVerifier::new(config, previous)?,
            users: config
                .users
                .iter()
                .map(|u| (u.name.clone(), u.clone()))
                .collect(),
        })
    }

    /// The identity a verified token stands for: what it says, or for a
    /// token minted for a local user, that user as the config has them now.
    fn verify(&self, token: &str) -> Result<CallerIdentity, AuthError> {
        let (identity, local_user) = self.verifier.verify(token)?;
        if !local_user {
            return Ok(identity);
        }
        self.users
            .get(&identity.user)
            .map(local_identity)
            .ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "`{}` is no longer a user of this gateway",
                    identity.user
                ))
            })
    }
}

fn local_identity(local: &LocalUser) -> CallerIdentity {
    CallerIdentity {
        user: local.name.clone(),
        groups: local.groups.clone(),
        attributes: local.attributes.clone(),
    }
}

/// Shared handle to the authenticator.
pub type AuthenticatorRef = Arc<Authenticator>;

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        Ok(Self {
            current: parking_lot::RwLock::new(Arc::new(Credentials::new(config, None)?)),
        })
    }

    /// Checks `config` and, when it is valid, makes its keys and users the
    /// ones every later call is checked against.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), AuthError> {
        let previous = self.credentials();
        let next = Credentials::new(config, Some(&previous.verifier))?;
        *self.current.write() = Arc::new(next);
        Ok(())
    }

    fn credentials(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.read())
    }

    /// Checks the value of an `authorization` header carrying a bearer token.
    pub fn authenticate_header(&self, header: Option<&str>) -> Result<CallerIdentity, AuthError> {
        let header = header.ok_or(AuthError::MissingCredentials)?;
        match split_scheme(header).as_ref().map(|(s, r)| (s.as_str(), *r)) {
            Some(("bearer", token)) => self.credentials().verify(token),
            Some(("basic", _)) => Err(AuthError::MalformedHeader(
                "Basic credentials are accepted only by Handshake; send the bearer token it returns".into(),
            )),
            _ => Err(AuthError::MalformedHeader(
                "expected `Bearer <token>`".into(),
            )),
        }
    }

    /// Handshake login: Basic credentials of a local user, or a bearer token
    /// to be echoed back. Returns the identity and the token to hand out.
    pub fn login(&self, header: Option<&str>) -> Result<(CallerIdentity, String), AuthError> {
        let header = header.ok_or(AuthError::MissingCredentials)?;
        let credentials = self.credentials();
        match split_scheme(header).as_ref().map(|(s, r)| (s.as_str(), *r)) {
            Some(("basic", encoded)) => {
                let (user, password) = decode_basic(encoded)?;
                let identity = check_password(&credentials, &user, &password)?;
                let token = credentials.verifier.mint(&identity, true)?;
                Ok((identity, token))
            }
            Some(("bearer", token)) => {
                let identity = credentials.verify(token)?;
                Ok((identity, token.to_string()))
            }
            _ => Err(AuthError::MalformedHeader(
                "expected `Basic <base64 user:password>` or `Bearer <token>`".into(),
            )),
        }
    }

    /// Checks a local user's password (argon2).
    pub fn check_password(&self, user: &str, password: &str) -> Result<CallerIdentity, AuthError> {
        check_password(&self.credentials(), user, password)
    }

    /// Mints a bearer token for a configured local user (the `token` command).
    pub fn mint_for_local_user(&self, user: &str) -> Result<String, AuthError> {
        let credentials = self.credentials();
        let local = credentials
            .users
            .get(user)
            .ok_or_else(|| AuthError::Minting(format!("`{user}` is not in [[auth.users]]")))?;
        credentials.verifier.mint(&local_identity(local), true)
    }

    /// A configured local user's identity.
    pub fn local_user(&self, user: &str) -> Option<CallerIdentity> {
        self.credentials().users.get(user).map(local_identity)
    }

    /// Mints a token for any identity (tests, `meshgate token --group`).
    pub fn mint(&self, identity: &CallerIdentity) -> Result<String, AuthError> {
        self.credentials().verifier.mint(identity, false)
    }
}

/// Checks a local user's password. Unknown users cost the same time as known
/// ones, so that names cannot be probed.
fn check_password(
    credentials: &Credentials,
    user: &str,
    password: &str,
) -> Result<CallerIdentity, AuthError> {
    match credentials.users.get(user) {
        Some(local) if password::verify(password, &local.password_hash) => {
            Ok(local_identity(local))
        }
        Some(_) => Err(AuthError::BadPassword),
        None => {
            password::verify_dummy(password);
            Err(AuthError::BadPassword)
        }
    }
}

/// Splits `Scheme value` into the lowercased scheme and the value.
/// The token of a `Bearer <token>` authorization header.
pub fn bearer_token(header: &str) -> Option<&str> {
    split_scheme(header).and_then(|(scheme, token)| (scheme == "bearer").then_some(token))
}

fn split_scheme(header: &str) -> Option<(String, &str)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    Some((scheme.to_ascii_lowercase(), rest.trim()))
}

/// Decodes `user:password` from base64, with or without padding.
fn decode_basic(encoded: &str) -> Result<(String, String), AuthError> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = LENIENT
        .decode(encoded.trim())
        .map_err(|_| AuthError::MalformedHeader("Basic credentials are not valid base64".into()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| AuthError::MalformedHeader("Basic credentials are not UTF-8".into()))?;
    let (user, password) = text.split_once(':').ok_or_else(|| {
        AuthError::MalformedHeader("Basic credentials must be `user:password`".into())
    })?;
    Ok((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_decode_with_and_without_padding() {
        // "alice:pw1" is 9 bytes: base64 needs no padding; "bob:pw" needs one `=`.
        assert_eq!(
            decode_basic("YWxpY2U6cHcx").unwrap(),
            ("alice".into(), "pw1".into())
        );
        assert_eq!(
            decode_basic("Ym9iOnB3").unwrap(),
            ("bob".into(), "pw".into())
        );
        assert_eq!(
            decode_basic("Ym9iOnB3MQ==").unwrap(),
            ("bob".into(), "pw1".into())
        );
        assert_eq!(
            decode_basic("Ym9iOnB3MQ").unwrap(),
            ("bob".into(), "pw1".into())
        );
        assert!(decode_basic("!!!").is_err());
        assert!(decode_basic("bm9jb2xvbg").is_err());
    }

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(split_scheme("bearer abc"), Some(("bearer".into(), "abc")));
        assert_eq!(split_scheme("Basic  xyz "), Some(("basic".into(), "xyz")));
        assert_eq!(split_scheme("token"), None);
    }
}
