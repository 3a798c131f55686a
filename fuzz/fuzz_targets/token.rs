//! Access tokens: arbitrary bytes as the `Authorization: Bearer` / `?access_token=` value,
//! through the binary's `Auth::verify` (unverified `iss` lookup, HS256 verification, claims)
//! and the permission mapping of whatever it accepts.
#![no_main]
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../../src/auth.rs"]
mod auth;

fn verifier() -> &'static auth::Auth {
    static AUTH: OnceLock<auth::Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let mut keys = BTreeMap::new();
        keys.insert("devkey".to_string(), "secret".to_string());
        auth::Auth::new(keys)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = verifier().verify(token) {
        let _ = auth::permission(&claims);
    }
});
