//! TLS over TCP with rustls and its `ring` provider: the controller's acceptor (with
//! optional client certificates) and the node's connector.
//!
//! Certificates and keys are read from PEM files once, when a controller or node starts.
//! Every failure here is a [`Error::Config`] naming the option and the file.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{BoxRead, BoxWrite};
use crate::error::{Error, Result};

/// The first byte of every TLS record that opens a connection (a handshake record).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's side: its certificate, and the CA its nodes' certificates must be
/// signed by, when it asks for them.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    client_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the certificate chain `cert` and its private key `key` (PEM). With
    /// `client_ca`, every node must present a certificate signed by one of its CAs.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls> {
        let chain = load_certs(cert, "tls_cert")?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| unreadable("tls_key", key, &e.to_string()))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = load_roots(ca, "tls_client_ca")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| unreadable("tls_client_ca", ca, &e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            Error::Config(format!(
                "tls_cert `{}` and tls_key do not make a usable certificate: {e}",
                cert.display()
            ))
        })?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_auth: client_ca.is_some(),
        })
    }

    /// Whether nodes must present a client certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_auth
    }

    /// Runs the server side of the TLS handshake on an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<(BoxRead, BoxWrite)> {
        let tls = self.acceptor.accept(stream).await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }
}

/// The node's side: which CAs it trusts, the name it expects in the controller's
/// certificate, and its own certificate for mutual TLS.
pub struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CAs in `ca` (PEM), or the system's roots when `None`; expects
    /// `server_name` (a DNS name or an IP address) in the controller's certificate;
    /// presents `identity` (certificate chain, key) when given.
    pub fn load(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> Result<ClientTls> {
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|_| {
            Error::Config(format!(
                "`{server_name}` is not a valid DNS name or IP address to check the controller's certificate against; set tls_server_name"
            ))
        })?;
        let config = client_config(ca, identity)?;
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name checked in the controller's certificate.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// Runs the client side of the TLS handshake on a new connection.
    pub async fn connect(&self, stream: TcpStream) -> io::Result<(BoxRead, BoxWrite)> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), stream)
            .await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }

    /// What a TLS failure on this node's connection means, with what to do about it;
    /// `None` when `e` is not a TLS error.
    pub fn explain(&self, e: &io::Error) -> Option<String> {
        let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some(explain(tls, &self.server_name()))
    }
}

/// The client side of TLS: trusts the CAs in `ca` (PEM), or the system's roots when
/// `None`; presents `identity` (certificate chain, key) when given. For the controller
/// link, and for the connection to a NATS cluster.
pub fn client_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<ClientConfig> {
    let roots = match ca {
        Some(ca) => load_roots(ca, "tls_ca")?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = load_certs(cert, "tls_client_cert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| unreadable("tls_client_key", key, &e.to_string()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::Config(format!(
                    "tls_client_cert `{}` and tls_client_key do not make a usable certificate: {e}",
                    cert.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The hint for a TLS error seen by a node.
fn explain(e: &rustls::Error, server_name: &str) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the controller's certificate is not signed by a CA this node trusts; give the node the CA that signed it with `tls_ca`".to_string()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the controller's certificate is not valid for `{server_name}`; connect by a name the certificate lists, or set `tls_server_name`"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the controller's certificate has expired".to_string()
        }
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the controller requires a client certificate (mutual TLS); give the node `tls_client_cert` and `tls_client_key`".to_string()
        }
        E::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError
            | AlertDescription::CertificateExpired,
        ) => {
            "the controller rejected this node's client certificate; it must be signed by the CA the controller was given with `tls_client_ca`".to_string()
        }
        _ => "check the TLS options of the node and the controller".to_string(),
    };
    format!("{e}; {hint}")
}

fn unreadable(option: &str, path: &Path, why: &str) -> Error {
    Error::Config(format!("cannot use {option} `{}`: {why}", path.display()))
}

fn load_certs(path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(option, path, &e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| unreadable(option, path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(unreadable(option, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_roots(path: &Path, option: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, option)? {
        roots
            .add(cert)
            .map_err(|e| unreadable(option, path, &e.to_string()))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(Error::Config(format!(
            "no trusted root certificates found on this system{}; give the CA that signed the controller's certificate with tls_ca",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        )));
    }
    Ok(roots)
}
