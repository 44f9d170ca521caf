//! Identity (DESIGN §4): every RPC but Handshake needs a valid bearer token.

use std::path::Path;

use arrow_flight::sql::{CommandGetCatalogs, ProstMessageExt};
use arrow_flight::{Criteria, Ticket};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;

use crate::fixture::{SECRET, TestServer, assert_status, row_count, statement};

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name),
    )
    .unwrap()
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn claims(user: &str) -> Value {
    json!({
        "sub": user, "iss": "meshgate", "aud": "meshgate",
        "iat": now(), "exp": now() + 600, "groups": ["analyst"], "region": "EUROPE",
    })
}

fn sign(claims: &Value, algorithm: Algorithm, key: &EncodingKey, kid: Option<&str>) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
    )
}

async fn expect_unauthenticated(server: &TestServer, token: &str, reason: &str) {
    let mut client = server.client().await.with_token(token);
    let error = client.query("SELECT 1").await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
    assert!(
        error.message().contains(reason),
        "{reason}: {}",
        error.message()
    );
}

#[tokio::test]
async fn handshake_mints_a_token_that_every_rpc_accepts() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let rows = client
        .query("SELECT count(*) AS n FROM crm.region")
        .await
        .unwrap();
    assert_eq!(
        crate::fixture::pretty(&rows).lines().nth(3).unwrap(),
        "| 5 |"
    );
    // Padded Basic credentials (as the JDBC driver sends them) work too.
    let mut jdbc = server.client().await;
    let mut request = tonic::Request::new(futures::stream::iter([
        arrow_flight::HandshakeRequest::default(),
    ]));
    request
        .metadata_mut()
        .insert("authorization", "Basic Ym9iOmJvYi1kZW1v".parse().unwrap());
    let response = jdbc.inner.handshake(request).await.unwrap();
    assert!(response.metadata().get("authorization").is_some());
    server.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_unauthenticated_alike() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let wrong = client
        .handshake_basic("alice", "not-her-password")
        .await
        .unwrap_err();
    let unknown = client
        .handshake_basic("mallory", "whatever")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), unknown.message());
    let mut request = tonic::Request::new(futures::stream::iter([
        arrow_flight::HandshakeRequest::default(),
    ]));
    request
        .metadata_mut()
        .insert("authorization", "Basic %%%".parse().unwrap());
    let malformed = client.inner.handshake(request).await.unwrap_err();
    assert_eq!(malformed.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn no_token_is_refused_on_every_rpc() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let info = client
        .flight_info(CommandGetCatalogs {}.as_any())
        .await
        .unwrap_err();
    assert_eq!(info.code(), Code::Unauthenticated);
    assert!(
        info.message().contains("no credentials"),
        "{}",
        info.message()
    );
    let get = client.fetch(Ticket::new("anything")).await.unwrap_err();
    assert_eq!(get.code(), Code::Unauthenticated);
    let action = client.action("CloseSession", vec![]).await.unwrap_err();
    assert_eq!(action.code(), Code::Unauthenticated);
    let list = client
        .inner
        .list_flights(tonic::Request::new(Criteria::default()))
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::Unauthenticated);
    // Basic credentials are for Handshake only.
    client.authorization = Some("Basic YWxpY2U6YWxpY2UtZGVtbw".into());
    let basic = client.query("SELECT 1").await.unwrap_err();
    assert_eq!(basic.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_with_a_clear_reason() {
    let server = TestServer::start().await;

    let forged = sign(
        &claims("alice"),
        Algorithm::HS256,
        &EncodingKey::from_secret(b"some-other-secret-of-enough-length"),
        None,
    );
    expect_unauthenticated(&server, &forged, "bad signature").await;

    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    expect_unauthenticated(&server, &hs256(&expired), "expired").await;

    let mut early = claims("alice");
    early["nbf"] = json!(now() + 3600);
    expect_unauthenticated(&server, &hs256(&early), "not valid yet").await;

    let mut audience = claims("alice");
    audience["aud"] = json!("someone-else");
    expect_unauthenticated(&server, &hs256(&audience), "wrong audience").await;

    let mut issuer = claims("alice");
    issuer["iss"] = json!("evil-issuer");
    expect_unauthenticated(&server, &hs256(&issuer), "wrong issuer").await;

    let mut no_exp = claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    expect_unauthenticated(&server, &hs256(&no_exp), "claim `exp` is missing").await;

    let mut text_exp = claims("alice");
    text_exp["exp"] = json!((now() + 3600).to_string());
    expect_unauthenticated(&server, &hs256(&text_exp), "not a number of seconds").await;

    expect_unauthenticated(&server, "not.a.jwt", "malformed").await;
    server.stop().await;
}

#[tokio::test]
async fn a_token_accepted_is_refused_once_it_expires() {
    let server = TestServer::start().await;
    // Valid for two more seconds, counting the 30 s of clock skew allowed.
    let mut soon = claims("alice");
    let expires = now() - 30 + 2;
    soon["exp"] = json!(expires);
    let token = hs256(&soon);
    let mut client = server.client().await.with_token(&token);
    client.query("SELECT 1").await.unwrap();
    client.query("SELECT 1").await.unwrap();
    while now() <= expires + 30 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    expect_unauthenticated(&server, &token, "expired").await;
    server.stop().await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    use base64::Engine;
    let server = TestServer::start().await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(claims("alice").to_string());
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        let mut client = server.client().await.with_token(&token);
        let error = client.query("SELECT 1").await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let server = TestServer::start().await;
    // The classic confusion: the attacker uses the published RSA key as an HMAC secret.
    let public_pem = key_file("rsa_public.pem");
    let token = sign(
        &claims("alice"),
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        Some("rsa-1"),
    );
    expect_unauthenticated(&server, &token, "bad signature").await;
    // An RSA token signed by a key that is not in the JWKS.
    let untrusted = EncodingKey::from_rsa_pem(&key_file("untrusted_rsa_private.pem")).unwrap();
    let token = sign(
        &claims("alice"),
        Algorithm::RS256,
        &untrusted,
        Some("rsa-1"),
    );
    expect_unauthenticated(&server, &token, "bad signature").await;
    // RS384 has no key configured for it.
    let rsa = EncodingKey::from_rsa_pem(&key_file("rsa_private.pem")).unwrap();
    let token = sign(&claims("alice"), Algorithm::RS384, &rsa, Some("rsa-1"));
    expect_unauthenticated(&server, &token, "algorithm not allowed").await;
    server.stop().await;
}

#[tokio::test]
async fn jwks_tokens_of_each_algorithm_are_accepted_for_any_user() {
    let server = TestServer::start().await;
    let keys = [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&key_file("rsa_private.pem")).unwrap(),
            "rsa-1",
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&key_file("ec_private.pem")).unwrap(),
            "ec-1",
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&key_file("ed_private.pem")).unwrap(),
            "ed-1",
        ),
    ];
    for (algorithm, key, kid) in keys {
        // `zoe` is not a local user: an identity provider's word is enough.
        let token = sign(&claims("zoe"), algorithm, &key, Some(kid));
        let mut client = server.client().await.with_token(&token);
        let rows = client
            .query("SELECT count(*) FROM crm.nation")
            .await
            .unwrap();
        assert_eq!(row_count(&rows), 1, "{algorithm:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_ticket_presented_by_another_user_is_refused() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let info = alice
        .flight_info(statement("SELECT * FROM crm.region"))
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut bob = server.login("bob").await;
    let error = bob.fetch(ticket.clone()).await.unwrap_err();
    assert_status(&error, Code::PermissionDenied, "another user");
    // The owner can still use it, and a forged ticket is a clear error.
    assert_eq!(row_count(&alice.fetch(ticket).await.unwrap()), 5);
    let forged = alice.fetch(Ticket::new(vec![1, 2, 3])).await.unwrap_err();
    assert_ne!(forged.code(), Code::Ok);
    server.stop().await;
}
