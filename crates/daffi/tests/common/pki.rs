//! Certificates for the TLS tests, made here by rcgen: a CA, a server certificate for
//! `127.0.0.1`/`localhost`, a client certificate, and another CA with its own client.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::unique;

/// A CA with a server certificate (for 127.0.0.1 and localhost) and a client
/// certificate, plus an unrelated CA with its own client certificate; all PEM files.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the certificates and writes them as PEM files into a new directory.
    pub fn new() -> Pki {
        let dir = std::env::temp_dir().join("daffi-tests").join(unique("pki"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let write =
            |name: &str, pem: String| std::fs::write(dir.join(name), pem).expect("write pem");

        let ca = make_ca("daffi test CA");
        write("ca.pem", ca.pem());
        let (cert, key) = make_leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write("server.pem", cert);
        write("server.key", key);
        let (cert, key) = make_leaf(
            &ca,
            &["node.daffi.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("client.pem", cert);
        write("client.key", key);

        let other = make_ca("another CA");
        write("other-ca.pem", other.pem());
        let (cert, key) = make_leaf(
            &other,
            &["node.daffi.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("other-client.pem", cert);
        write("other-client.key", key);
        Pki { dir }
    }

    /// The file `name` (`ca.pem`, `server.pem`, `client.key`, `other-ca.pem`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

fn make_leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}
