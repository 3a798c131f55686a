//! Cluster PKI: a cluster CA issues one certificate per node; every QUIC connection between nodes
//! is mutually authenticated against that CA.
//!
//! A node's certificate names it `node-<id>.arbor.internal`. The dialing side verifies the server
//! presents the name of the node it meant to reach; the accepting side verifies the client's
//! certificate chains to the CA *and* names the node id the client claims in its `Hello` frame,
//! so one node's key cannot impersonate another.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::transport::TransportError;

/// ALPN protocol id of Arbor's node-to-node QUIC connections.
pub const ALPN: &[u8] = b"arbor-cluster/1";

/// DNS name carried by node `id`'s certificate.
pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.arbor.internal")
}

/// PEM-encoded certificate and private key.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// Generates a new cluster CA (self-signed).
pub fn generate_ca(cluster_id: &str) -> Result<PemPair, TransportError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, format!("arbor cluster {cluster_id} CA"));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(tls_err)?;
    let cert = p.self_signed(&key).map_err(tls_err)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues node `id`'s certificate, signed by the CA.
pub fn issue_node_cert(ca: &PemPair, id: u64) -> Result<PemPair, TransportError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(tls_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(tls_err)?;
    let mut p = CertificateParams::new(vec![node_server_name(id)]).map_err(tls_err)?;
    p.distinguished_name
        .push(DnType::CommonName, node_server_name(id));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(tls_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// TLS material a node needs: the CA certificate and its own certificate and key.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub ca_cert_pem: String,
    pub node: PemPair,
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    let v: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let v = v.map_err(|e| TransportError::Tls(format!("{what}: {e}")))?;
    if v.is_empty() {
        return Err(TransportError::Tls(format!(
            "{what}: no certificate in PEM"
        )));
    }
    Ok(v)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TransportError::Tls(format!("node key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeTls {
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&self.ca_cert_pem, "CA certificate")? {
            roots.add(c).map_err(tls_err)?;
        }
        Ok(Arc::new(roots))
    }

    /// rustls server config: requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(tls_err)?;
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs(&self.node.cert_pem, "node certificate")?,
                key(&self.node.key_pem)?,
            )
            .map_err(tls_err)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }

    /// rustls client config: presents our certificate, trusts only the cluster CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(
                certs(&self.node.cert_pem, "node certificate")?,
                key(&self.node.key_pem)?,
            )
            .map_err(tls_err)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }
}

/// Checks that a (CA-verified) peer certificate names node `id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, id: u64) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_server_name(id)) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cert_names_its_node_only() {
        let ca = generate_ca("test").unwrap();
        let n = issue_node_cert(&ca, 7).unwrap();
        let der = &certs(&n.cert_pem, "x").unwrap()[0];
        assert!(cert_names_node(der, 7));
        assert!(!cert_names_node(der, 8));
        let tls = NodeTls {
            ca_cert_pem: ca.cert_pem,
            node: n,
        };
        tls.server_config().unwrap();
        tls.client_config().unwrap();
    }

    #[test]
    fn garbage_pem_is_an_error() {
        let tls = NodeTls {
            ca_cert_pem: "nope".into(),
            node: PemPair {
                cert_pem: "x".into(),
                key_pem: "y".into(),
            },
        };
        assert!(tls.server_config().is_err());
    }
}
