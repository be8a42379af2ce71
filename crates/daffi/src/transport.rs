//! Byte streams between nodes and the controller: TCP or a Unix socket.
//!
//! Everything above this module sees a boxed reader and writer, so that TLS can wrap
//! either transport without touching the protocol code.

use std::fmt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};

/// The read half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Where the controller listens and where nodes connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host and port. Port 0 asks the controller for a free port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port number.
        port: u16,
    },
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl Address {
    /// The default when neither host nor socket path is given: `<temp dir>/daffi/.sock`.
    pub fn default_unix() -> Address {
        Address::Unix(std::env::temp_dir().join("daffi").join(".sock"))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Opens a connection to `address`.
pub async fn connect(address: &Address) -> std::io::Result<(BoxRead, BoxWrite)> {
    match address {
        Address::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        #[cfg(unix)]
        Address::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        #[cfg(not(unix))]
        Address::Unix(_) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "Unix sockets are not available on this platform; use host and port",
        )),
    }
}

/// A bound listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain socket; the file is removed when the listener is dropped.
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, UnixSocketFile),
}

/// Removes the socket file when the controller stops.
#[cfg(unix)]
pub struct UnixSocketFile(PathBuf);

#[cfg(unix)]
impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds `address`. For TCP port 0 a free port is chosen (see [`Listener::local_address`]).
    /// For a Unix socket the directory is created owner-only, a stale socket file left by a
    /// dead controller is replaced, and a live one is refused.
    pub async fn bind(address: &Address) -> Result<Listener> {
        let bind_err = |source| Error::Bind {
            address: address.to_string(),
            source,
        };
        match address {
            Address::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(bind_err)?;
                Ok(Listener::Tcp(l))
            }
            #[cfg(unix)]
            Address::Unix(path) => {
                prepare_unix_path(path).await.map_err(bind_err)?;
                let l = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
                restrict_to_owner(path, 0o600).map_err(bind_err)?;
                Ok(Listener::Unix(l, UnixSocketFile(path.clone())))
            }
            #[cfg(not(unix))]
            Address::Unix(_) => Err(Error::Config(
                "Unix sockets are not available on this platform; use host and port".into(),
            )),
        }
    }

    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_address(&self) -> Result<Address> {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(Address::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
            #[cfg(unix)]
            Listener::Unix(_, file) => Ok(Address::Unix(file.0.clone())),
        }
    }

    /// Accepts the next connection; returns its halves and a description of the peer.
    pub async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
            }
            #[cfg(unix)]
            Listener::Unix(l, file) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), file.0.display().to_string()))
            }
        }
    }
}

#[cfg(unix)]
async fn prepare_unix_path(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            restrict_to_owner(dir, 0o700)?;
        }
    }
    if path.exists() {
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a live controller already listens on this socket",
                ))
            }
            Err(_) => {
                tracing::info!(path = %path.display(), "replacing a stale socket file");
                std::fs::remove_file(path)?;
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn restrict_to_owner(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
