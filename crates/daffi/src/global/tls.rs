//! The TLS options of a `Global`, checked against the roles it runs (controller, node,
//! both) before any certificate is read.

use std::sync::Arc;

use super::GlobalBuilder;
use crate::error::{Error, Result};
use crate::transport::{Address, ClientTls, ServerTls, UNIX_NO_TLS};

/// The TLS of a `Global`: its controller's side and its node's side.
pub(super) type TlsSides = (Option<Arc<ServerTls>>, Option<Arc<ClientTls>>);

impl GlobalBuilder {
    /// Checks the TLS options against the roles of this `Global` and loads the
    /// certificates: the controller's side, and the node's. A node that runs beside its
    /// controller reaches it in-process, without TLS: its side is `None`, and the node
    /// options are left to the other processes of the mesh (which often share the
    /// same settings).
    pub(super) fn load_tls(&self, address: &Address) -> Result<TlsSides> {
        let controller_options =
            self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some();
        let node_options = self.tls
            || self.tls_ca.is_some()
            || self.tls_server_name.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_client_key.is_some();
        if !controller_options && !node_options {
            return Ok((None, None));
        }
        let host = match address {
            Address::Tcp { host, .. } => host,
            Address::Unix(_) => return Err(Error::Config(UNIX_NO_TLS.into())),
            // A node on NATS takes its TLS from `nats_tls`, not from here.
            Address::Nats(_) => return Ok((None, None)),
        };
        let server = if controller_options {
            if !self.init_controller {
                return Err(Error::Config(
                    "tls_cert, tls_key and tls_client_ca set up a controller, and this Global runs none; a node's own certificate (mutual TLS) is tls_client_cert and tls_client_key".into(),
                ));
            }
            let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
                return Err(Error::Config(
                    "TLS on the controller needs both tls_cert and tls_key".into(),
                ));
            };
            Some(Arc::new(ServerTls::load(
                cert,
                key,
                self.tls_client_ca.as_deref(),
            )?))
        } else {
            None
        };
        if node_options && !self.init_node {
            return Err(Error::Config(
                "tls, tls_ca, tls_server_name, tls_client_cert and tls_client_key set up a node, and this Global runs none (init_node(false))".into(),
            ));
        }
        let identity = self.client_identity()?;
        if self.init_controller {
            if node_options && server.is_none() {
                return Err(Error::Config(
                    "tls, tls_ca, tls_server_name, tls_client_cert and tls_client_key set up nodes for a TLS controller, and the controller this Global runs has no tls_cert and tls_key: other nodes with these settings could not connect".into(),
                ));
            }
            return Ok((server, None));
        }
        let server_name = self.tls_server_name.as_deref().unwrap_or(host);
        let client = ClientTls::load(self.tls_ca.as_deref(), identity, server_name)?;
        Ok((server, Some(Arc::new(client))))
    }
}

impl GlobalBuilder {
    /// The TLS of the connection to the NATS servers: `tls_ca` and the client
    /// certificate, or none. The controller's options have no place there.
    #[cfg(feature = "nats")]
    pub(super) fn nats_tls(&self) -> Result<Option<rustls::ClientConfig>> {
        if self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some() {
            return Err(Error::Config(
                "tls_cert, tls_key and tls_client_ca set up a controller, and a mesh on NATS has none; TLS to the NATS servers is tls_ca and tls_client_cert/tls_client_key".into(),
            ));
        }
        if self.tls_server_name.is_some() {
            return Err(Error::Config(
                "tls_server_name does not apply to NATS: the servers' certificates are checked against the hosts of their URLs".into(),
            ));
        }
        let identity = self.client_identity()?;
        if !self.tls && self.tls_ca.is_none() && identity.is_none() {
            return Ok(None);
        }
        crate::transport::client_config(self.tls_ca.as_deref(), identity).map(Some)
    }
}

impl GlobalBuilder {
    /// The node's client certificate and key, if given (both or neither).
    fn client_identity(&self) -> Result<Option<(&std::path::Path, &std::path::Path)>> {
        match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Ok(Some((cert.as_path(), key.as_path()))),
            (None, None) => Ok(None),
            _ => Err(Error::Config(
                "a client certificate needs both tls_client_cert and tls_client_key".into(),
            )),
        }
    }
}
