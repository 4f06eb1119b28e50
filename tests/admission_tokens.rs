//! The gate over real sockets: what passes, what is held back, and what the upstream sees.

mod common;

use common::*;
use http::StatusCode;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{json, Value};
use vestibule::token::unix_now;

#[tokio::test]
async fn unprotected_paths_pass_through_untouched() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let (status, _, body) = get(gate.addr, "/product?color=red", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "upstream saw /product");
    let seen = upstream.last();
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/product?color=red");
    assert_eq!(seen.headers["host"], "shop.test");
    assert!(!seen.headers.contains_key("vestibule-room"));
}

#[tokio::test]
async fn protected_path_without_token_is_held_and_never_forwarded() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let (status, headers, _) = get(gate.addr, "/checkout", &[]).await;
    assert!(is_gate_wait(status), "got {status}");
    assert!(headers.contains_key("retry-after"));
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn valid_token_by_cookie_and_by_header_is_forwarded_with_our_headers() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let token = gate.token("checkout");

    let cookie = format!("theme=dark; vestibule-token-checkout={token}");
    let (status, _, body) = get(gate.addr, "/checkout/pay", &[("cookie", &cookie)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = upstream.last();
    assert_eq!(seen.headers["vestibule-room"], "checkout");
    assert_eq!(seen.headers["vestibule-visitor"], "visitor-1");

    let (status, _, _) = get(gate.addr, "/api/cart/checkout", &[("vestibule-token", &token)]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.uri.path(), "/api/cart/checkout");
    assert!(!seen.headers.contains_key("vestibule-token"), "the token header is ours, not the upstream's");

    // A client cannot name itself a visitor.
    let (status, _, _) = get(
        gate.addr,
        "/checkout",
        &[("vestibule-token", &token), ("vestibule-visitor", "admin"), ("vestibule-room", "x")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers.get_all("vestibule-visitor").iter().collect::<Vec<_>>(), ["visitor-1"]);
    assert_eq!(seen.headers.get_all("vestibule-room").iter().collect::<Vec<_>>(), ["checkout"]);
}

/// Sign arbitrary claims with the gate's own key (so only the claims are wrong).
fn sign(gate: &Harness, claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(&gate.key_path).unwrap();
    let key = EncodingKey::from_ed_pem(&pem).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn good_claims(room: &str) -> Value {
    let now = unix_now();
    json!({"iss": "vestibule", "aud": room, "sub": "v", "iat": now, "nbf": now, "exp": now + 600, "jti": "j", "tkt": 0})
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[tokio::test]
async fn every_kind_of_bad_token_counts_as_no_token() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let kid = gate.running.gate().tokens().ring().signing_kid().to_owned();
    let now = unix_now();

    // The well-formed control: the same signing path must pass, or the cases prove nothing.
    let control = sign(&gate, &good_claims("checkout"), Some(&kid));
    let (status, _, _) = get(gate.addr, "/checkout", &[("vestibule-token", &control)]).await;
    assert_eq!(status, StatusCode::OK, "the control token must pass");

    let mut cases: Vec<(String, String)> = Vec::new();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = good_claims("checkout");
        change(&mut claims);
        claims
    };
    cases.push(("expired".into(), sign(&gate, &with(&|c| c["exp"] = json!(now - 60)), Some(&kid))));
    cases.push(("not yet valid".into(), sign(&gate, &with(&|c| c["nbf"] = json!(now + 600)), Some(&kid))));
    cases.push(("other room".into(), sign(&gate, &good_claims("other"), Some(&kid))));
    cases.push(("wrong issuer".into(), sign(&gate, &with(&|c| c["iss"] = json!("evil")), Some(&kid))));
    cases.push(("audience list".into(), sign(&gate, &with(&|c| c["aud"] = json!(["checkout"])), Some(&kid))));
    for claim in ["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "tkt"] {
        let token = sign(&gate, &with(&|c| drop(c.as_object_mut().unwrap().remove(claim))), Some(&kid));
        cases.push((format!("missing {claim}"), token));
    }
    cases.push(("no kid".into(), sign(&gate, &good_claims("checkout"), None)));
    cases.push(("unknown kid".into(), sign(&gate, &good_claims("checkout"), Some("not-a-key"))));
    cases.push(("path-like kid".into(), sign(&gate, &good_claims("checkout"), Some("../../../etc/passwd"))));
    cases.push(("huge kid".into(), sign(&gate, &good_claims("checkout"), Some(&"k".repeat(5000)))));

    let payload = b64(good_claims("checkout").to_string().as_bytes());
    let none_header = b64(json!({"alg": "none", "kid": kid, "typ": "JWT"}).to_string().as_bytes());
    cases.push(("alg none".into(), format!("{none_header}.{payload}.")));

    // HS256 "signed" with our public key: the classic algorithm confusion.
    let jwks: JwkSet = serde_json::from_slice(&gate.running.gate().tokens().ring().jwks()).unwrap();
    let public = serde_json::to_vec(&jwks.keys[0]).unwrap();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    let confused =
        jsonwebtoken::encode(&hs_header, &good_claims("checkout"), &EncodingKey::from_secret(&public)).unwrap();
    cases.push(("HS256 with the public key".into(), confused));
    let raw_public = {
        use base64::Engine;
        let x = match &jwks.keys[0].algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p) => p.x.clone(),
            other => panic!("expected an OKP key, got {other:?}"),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x).unwrap()
    };
    let confused_raw =
        jsonwebtoken::encode(&hs_header, &good_claims("checkout"), &EncodingKey::from_secret(&raw_public)).unwrap();
    cases.push(("HS256 with the raw public key".into(), confused_raw));

    let mut tampered = control.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    cases.push(("tampered signature".into(), String::from_utf8(tampered).unwrap()));
    let forged_payload = b64(with(&|c| c["sub"] = json!("someone-else")).to_string().as_bytes());
    let mut parts: Vec<&str> = control.split('.').collect();
    parts[1] = &forged_payload;
    cases.push(("swapped payload".into(), parts.join(".")));
    cases.push(("garbage".into(), "not.a.token".into()));
    cases.push(("huge".into(), "a".repeat(8000)));

    let before = upstream.requests().len();
    for (name, token) in &cases {
        let (status, _, _) = get(gate.addr, "/checkout", &[("vestibule-token", token)]).await;
        assert!(is_gate_wait(status), "{name}: header token got {status}");
        let cookie = format!("vestibule-token-checkout={token}");
        let (status, _, _) = get(gate.addr, "/checkout", &[("cookie", &cookie)]).await;
        assert!(is_gate_wait(status), "{name}: cookie token got {status}");
    }
    assert_eq!(upstream.requests().len(), before, "no bad token may reach the upstream");
}

#[tokio::test]
async fn a_token_for_one_room_does_not_open_another() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let other = gate.token("other");
    let (status, _, _) = get(gate.addr, "/checkout", &[("vestibule-token", &other)]).await;
    assert!(is_gate_wait(status));
    let cookie = format!("vestibule-token-checkout={other}");
    let (status, _, _) = get(gate.addr, "/checkout", &[("cookie", &cookie)]).await;
    assert!(is_gate_wait(status));
    let (status, _, _) = get(gate.addr, "/other/x", &[("vestibule-token", &other)]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn no_spelling_of_a_protected_path_slips_past_the_room() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let variants = [
        "/checkout",
        "/Checkout",
        "/CHECKOUT/pay",
        "/%63heckout",
        "/%43heckout",
        "//checkout",
        "/x/../checkout",
        "/x/%2e%2e/checkout",
        "/./checkout",
        "/checkout;a=b",
        "/checkout;a=b/pay",
        "/checkout%3Bx",
        "/api/cart/../cart/checkout",
        "/api//cart/checkout",
        "/api%2Fcart%2Fcheckout",
        "/%5Ccheckout",
    ];
    for path in variants {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(gate.addr, request.as_bytes()).await;
        assert_eq!(status, 503, "{path} must be held by the room, got: {text}");
        assert!(text.contains(r#""status":"paused""#), "{path}: the line's answer: {text}");
    }
    assert!(upstream.requests().is_empty(), "none of them may reach the upstream: {:?}", upstream.requests());

    // An encoded traversal out of the room is a different (unprotected) path, and the
    // upstream receives exactly the form the gate matched.
    let request = "GET /checkout%2F..%2Fproduct HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    let (status, _) = raw(gate.addr, request.as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.last().uri.path(), "/product");

    // The forwarded form of an admitted request is the canonical one.
    let token = gate.token("checkout");
    let request = format!(
        "GET /x/../Checkout//pay;p=1?q=1 HTTP/1.1\r\nHost: shop.test\r\nVestibule-Token: {token}\r\nConnection: close\r\n\r\n"
    );
    let (status, _) = raw(gate.addr, request.as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.last().uri.path_and_query().unwrap().as_str(), "/Checkout/pay?q=1");
}

#[tokio::test]
async fn hostile_paths_are_refused_with_400() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    for path in ["/a%00b", "/%ff%fe", "/checkout%0d%0aX-Injected:%201"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n");
        let (status, _) = raw(gate.addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{path}");
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn jwks_verifies_our_tokens_with_a_standard_library() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    for path in ["/.well-known/jwks.json", "/_vestibule/jwks.json"] {
        let (status, headers, body) = get(gate.addr, path, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/jwk-set+json");
        let set: JwkSet = serde_json::from_str(&body).unwrap();
        let token = gate.token("checkout");
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        let jwk = set.find(&kid).expect("the signing key is published under its kid");
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["checkout"]);
        validation.set_issuer(&["vestibule"]);
        let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["sub"], "visitor-1");
        assert!(!body.contains("\"d\""), "no private part may be published");
    }
    let (status, _, _) = get(gate.addr, "/_vestibule/nothing-here", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
