//! Bearer tokens: verification against keys from config only (never from a
//! token's `kid`/`jku`/`x5u`), with an explicit algorithm allow-list, and the
//! minting of tokens for local users.

use std::collections::BTreeMap;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::{AuthError, CallerIdentity};
use crate::config::AuthConfig;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECONDS: u64 = 30;

/// Marks a token this gateway minted for one of its local users: the user's
/// groups and attributes are then read from the current config on every
/// call, so that a reload that changes or removes the user applies at once.
pub(super) const LOCAL_USER_CLAIM: &str = "meshgate_local_user";

/// Claims with a meaning of their own; never turned into attributes.
const REGISTERED_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    LOCAL_USER_CLAIM,
];

/// A public key from the JWKS file, bound to the one algorithm it may verify.
struct JwksKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Tokens verified already are remembered this long at most (and never
/// past their `exp`), so that the several calls of one query check a
/// token's signature once.
const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// A token verified: the identity it carries, whether it was minted for a
/// local user, and its `nbf` and `exp`.
#[derive(Debug, Clone)]
struct Verified {
    identity: CallerIdentity,
    local_user: bool,
    not_before: u64,
    expires: u64,
}

impl Verified {
    /// Whether the token is valid at `now` (seconds since the epoch), with
    /// the leeway of a full verification.
    fn valid_at(&self, now: u64) -> bool {
        self.not_before <= now + LEEWAY_SECONDS && now <= self.expires + LEEWAY_SECONDS
    }
}

/// Verifies and mints bearer tokens.
pub struct TokenVerifier {
    issuer: String,
    audience: String,
    groups_claim: String,
    ttl_seconds: u64,
    /// HS256 secret: the configured one or, without one, a random per-process
    /// secret used only for tokens this process mints.
    hs256_secret: Vec<u8>,
    /// The secret was drawn at random, not configured.
    random_secret: bool,
    jwks: Vec<JwksKey>,
    /// Tokens verified with these keys, by their text.
    verified: moka::sync::Cache<String, Verified>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("jwks_keys", &self.jwks.len())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for `config`. Without a configured HS256 secret, the
    /// random secret of `previous` is kept (tokens minted before a reload
    /// stay valid), or a new one is drawn.
    pub fn new(config: &AuthConfig, previous: Option<&TokenVerifier>) -> Result<Self, AuthError> {
        let hs256_secret = match (&config.hs256_secret, previous) {
            (Some(secret), _) => secret.as_bytes().to_vec(),
            (None, Some(previous)) if previous.random_secret => previous.hs256_secret.clone(),
            (None, _) => {
                use rand::RngCore;
                let mut secret = vec![0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                secret
            }
        };
        let jwks = match &config.jwks_file {
            Some(path) => load_jwks(path)?,
            None => Vec::new(),
        };
        Ok(Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            groups_claim: config.groups_claim.clone(),
            ttl_seconds: config.token_ttl.as_secs().max(1),
            hs256_secret,
            random_secret: config.hs256_secret.is_none(),
            jwks,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
        })
    }

    /// Verifies a compact JWS and returns the identity it carries, and
    /// whether it was minted for a local user. A token verified moments ago
    /// is only checked against the clock again.
    pub fn verify(&self, token: &str) -> Result<(CallerIdentity, bool), AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = self.verified.get(token)
            && verified.valid_at(now)
        {
            return Ok((verified.identity, verified.local_user));
        }
        let verified = self.verify_signed(token)?;
        if verified.valid_at(now) {
            self.verified.insert(token.to_string(), verified.clone());
        }
        Ok((verified.identity, verified.local_user))
    }

    /// Verifies a compact JWS: its header, signature and claims.
    fn verify_signed(&self, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName => {
                AuthError::InvalidToken("algorithm not allowed".into())
            }
            _ => AuthError::InvalidToken("malformed token".into()),
        })?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;

        let claims = match header.alg {
            Algorithm::HS256 => decode(
                token,
                &DecodingKey::from_secret(&self.hs256_secret),
                &validation,
            )?,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA => {
                let mut candidates = self.jwks.iter().filter(|k| {
                    k.algorithm == header.alg
                        && match (&header.kid, &k.kid) {
                            (Some(wanted), Some(kid)) => wanted == kid,
                            _ => true,
                        }
                });
                let mut last_error = AuthError::InvalidToken("algorithm not allowed".into());
                loop {
                    let Some(candidate) = candidates.next() else {
                        return Err(last_error);
                    };
                    match decode(token, &candidate.key, &validation) {
                        Ok(claims) => break claims,
                        Err(e) => last_error = e,
                    }
                }
            }
            _ => return Err(AuthError::InvalidToken("algorithm not allowed".into())),
        };
        let local_user = claims.get(LOCAL_USER_CLAIM) == Some(&Value::Bool(true));
        let time = |claim: &str| claims.get(claim).and_then(Value::as_u64);
        // `exp` is required, but may be written as a fraction: such a token
        // is valid now (it was just verified) and is not remembered.
        let (not_before, expires) = (time("nbf").unwrap_or(0), time("exp").unwrap_or(0));
        Ok(Verified {
            identity: self.identity_from_claims(claims)?,
            local_user,
            not_before,
            expires,
        })
    }

    fn identity_from_claims(
        &self,
        claims: Map<String, Value>,
    ) -> Result<CallerIdentity, AuthError> {
        let user = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => {
                return Err(AuthError::InvalidToken(
                    "claim `sub` must be a non-empty string".into(),
                ));
            }
        };
        let groups = match claims.get(&self.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(group)) => vec![group.clone()],
            Some(Value::Array(values)) => values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(_) => {
                return Err(AuthError::InvalidToken(format!(
                    "claim `{}` must be an array of strings",
                    self.groups_claim
                )));
            }
        };
        let attributes: BTreeMap<String, String> = claims
            .iter()
            .filter(|(name, _)| {
                !REGISTERED_CLAIMS.contains(&name.as_str()) && **name != self.groups_claim
            })
            .filter_map(|(name, value)| value.as_str().map(|v| (name.clone(), v.to_string())))
            .collect();
        Ok(CallerIdentity {
            user,
            groups,
            attributes,
        })
    }

    /// Mints an HS256 token for `identity`, valid for the configured TTL;
    /// `local_user` marks the token of a configured local user.
    pub fn mint(&self, identity: &CallerIdentity, local_user: bool) -> Result<String, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = Map::new();
        for (name, value) in &identity.attributes {
            if !REGISTERED_CLAIMS.contains(&name.as_str()) && *name != self.groups_claim {
                claims.insert(name.clone(), Value::String(value.clone()));
            }
        }
        claims.insert("sub".into(), Value::String(identity.user.clone()));
        if local_user {
            claims.insert(LOCAL_USER_CLAIM.into(), Value::Bool(true));
        }
        claims.insert("iss".into(), Value::String(self.issuer.clone()));
        claims.insert("aud".into(), Value::String(self.audience.clone()));
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("exp".into(), (now + self.ttl_seconds).into());
        claims.insert(
            self.groups_claim.clone(),
            Value::Array(identity.groups.iter().cloned().map(Value::String).collect()),
        );
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.hs256_secret),
        )
        .map_err(|e| AuthError::Minting(e.to_string()))
    }
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Map<String, Value>, AuthError> {
    jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|e| {
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "token has expired".to_string(),
                ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_string(),
                ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
                ErrorKind::InvalidAudience => "wrong audience".to_string(),
                ErrorKind::InvalidSignature => "bad signature".to_string(),
                ErrorKind::InvalidAlgorithm => "algorithm not allowed".to_string(),
                // The library tells a time claim that is not a number as missing.
                ErrorKind::MissingRequiredClaim(claim) if claim == "exp" || claim == "nbf" => {
                    format!("claim `{claim}` is missing or not a number of seconds since the epoch")
                }
                ErrorKind::MissingRequiredClaim(claim) => format!("missing claim `{claim}`"),
                ErrorKind::InvalidClaimFormat(claim) => format!("claim `{claim}` is malformed"),
                _ => "malformed token".to_string(),
            };
            AuthError::InvalidToken(reason)
        })
}

fn load_jwks(path: &std::path::Path) -> Result<Vec<JwksKey>, AuthError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthError::Keys(format!("{}: {e}", path.display())))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| AuthError::Keys(format!("{}: not a JWKS document: {e}", path.display())))?;
    set.keys
        .iter()
        .enumerate()
        .map(|(index, jwk)| {
            let algorithm = jwk_algorithm(jwk).ok_or_else(|| {
                AuthError::Keys(format!(
                    "{}: keys[{index}]: cannot tell its algorithm (set `alg`; RS256, ES256 and EdDSA are supported)",
                    path.display()
                ))
            })?;
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| AuthError::Keys(format!("{}: keys[{index}]: {e}", path.display())))?;
            Ok(JwksKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            })
        })
        .collect()
}

/// The algorithm a public key verifies: its `alg`, or the usual one for its type.
/// Symmetric (`oct`) keys are refused: a JWKS holds public keys only.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let declared = jwk
        .common
        .key_algorithm
        .and_then(|alg| alg.to_string().parse::<Algorithm>().ok());
    let algorithm = match (&jwk.algorithm, declared) {
        (AlgorithmParameters::OctetKey(_), _) => return None,
        (_, Some(declared)) => declared,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
    };
    let family_matches = matches!(
        (&jwk.algorithm, algorithm),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (
            AlgorithmParameters::EllipticCurve(_),
            Algorithm::ES256 | Algorithm::ES384
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
    );
    family_matches.then_some(algorithm)
}
