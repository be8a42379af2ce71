//! Byte streams between nodes and the controller: TCP (optionally under TLS), a Unix
//! socket, or an in-process pipe for the node of the process that runs the controller.
//!
//! Everything above this module sees a boxed reader and writer; only a node's
//! [`SharedReads`] knows where frames start, so that a thread spinning for its reply can
//! take it from a plaintext socket. TLS lives in [`tls`]; a Unix socket is protected by
//! file permissions instead, and an in-process pipe never leaves the process.

#[cfg(unix)]
mod shared_reads;
#[cfg(unix)]
mod split;
mod tls;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::error::{Error, Result};
#[cfg(feature = "nats")]
pub use tls::client_config;
pub use tls::{ClientTls, ServerTls, TLS_HANDSHAKE_RECORD};

/// The read half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

#[cfg(unix)]
pub use shared_reads::{SharedReads, Taken};

/// Stands in for the shared reads of a plaintext socket where there are none.
#[cfg(not(unix))]
#[derive(Debug)]
pub enum SharedReads {}

#[cfg(not(unix))]
impl SharedReads {
    /// Never called: there is no such value.
    pub fn take_frame(
        &self,
        _max_frame_size: usize,
        _wanted: impl FnOnce(&daffi_wire::Frame) -> bool,
        _deliver: impl FnOnce(daffi_wire::Frame),
    ) -> Taken {
        match *self {}
    }

    /// Never called: there is no such value.
    pub fn mute(&self) -> bool {
        match *self {}
    }

    /// Never called: there is no such value.
    pub fn release(&self) {
        match *self {}
    }
}

/// What [`SharedReads::take_frame`] found (never, off Unix).
#[cfg(not(unix))]
#[derive(Debug)]
pub enum Taken {
    /// The frame wanted, delivered.
    Frame,
    /// Nothing to read.
    Nothing,
    /// Bytes that are the reader task's.
    ForReader,
}

/// A node's end of its link: its reader and writer, and, on a plaintext socket, the
/// reader's reads as a thread waiting for its own reply may share them
/// ([`SharedReads`]).
pub struct Halves {
    /// The read half.
    pub read: BoxRead,
    /// The write half.
    pub write: BoxWrite,
    /// `None` under TLS (and off Unix).
    pub shared_reads: Option<std::sync::Arc<SharedReads>>,
}

impl Halves {
    /// Halves whose reads no waiting thread shares.
    fn unshared((read, write): (BoxRead, BoxWrite)) -> Halves {
        Halves {
            read,
            write,
            shared_reads: None,
        }
    }
}

/// Where the controller listens and where nodes connect. More kinds of address may
/// come (a match needs a `_` arm).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// A NATS cluster: the server URLs given to `nats(..)`, comma-separated. What
    /// [`Global::address`](crate::Global::address) says of a node on NATS; no
    /// controller listens there.
    Nats(String),
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
            Address::Nats(urls) => f.write_str(urls),
        }
    }
}

/// Why a connection to the controller could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// Nothing answers at the address (yet), or the socket failed: worth retrying.
    Unreachable(io::Error),
    /// The TLS handshake failed: a configuration mismatch, with what to do about it, and
    /// the error behind it, if there was one.
    Tls(String, Option<io::Error>),
    /// The Unix socket, or its directory, or the process listening on it, belongs to
    /// another user ([`Error::UnsafeSocket`]). Nothing was sent.
    Unsafe(Error),
}

/// Opens a connection to `address`, under TLS when `tls` is given (TCP only); a
/// plaintext one with its reads shared if `share_reads` (see [`SharedReads`]).
pub async fn connect(
    address: &Address,
    tls: Option<&ClientTls>,
    share_reads: bool,
) -> std::result::Result<Halves, ConnectError> {
    match address {
        Address::Tcp { host, port } => {
            let addresses = resolve(host, *port)
                .await
                .map_err(ConnectError::Unreachable)?;
            let stream = TcpStream::connect(&addresses[..])
                .await
                .map_err(ConnectError::Unreachable)?;
            stream
                .set_nodelay(true)
                .map_err(ConnectError::Unreachable)?;
            match tls {
                None => stream
                    .into_node_halves(share_reads)
                    .map_err(ConnectError::Unreachable),
                Some(tls) => tls.connect(stream).await.map(Halves::unshared).map_err(|e| {
                    let message = tls.explain(&e).unwrap_or_else(|| {
                        format!(
                            "the TLS handshake did not complete ({e}); check that the controller uses TLS (tls_cert and tls_key)"
                        )
                    });
                    ConnectError::Tls(message, Some(e))
                }),
            }
        }
        #[cfg(unix)]
        Address::Unix(path) => {
            if tls.is_some() {
                return Err(ConnectError::Tls(UNIX_NO_TLS.into(), None));
            }
            let refuse = |why: String| {
                ConnectError::Unsafe(Error::UnsafeSocket {
                    path: path.clone(),
                    message: format!("{why}; another user could receive this node's calls there: use unix_sock_path in a directory you own"),
                })
            };
            unix::check_socket(path).map_err(refuse)?;
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(ConnectError::Unreachable)?;
            unix::check_peer(&stream).map_err(refuse)?;
            stream
                .into_node_halves(share_reads)
                .map_err(ConnectError::Unreachable)
        }
        #[cfg(not(unix))]
        Address::Unix(_) => Err(ConnectError::Unreachable(io::Error::new(
            io::ErrorKind::Unsupported,
            "Unix sockets are not available on this platform; use host and port",
        ))),
        Address::Nats(_) => Err(ConnectError::Unreachable(io::Error::new(
            io::ErrorKind::InvalidInput,
            NATS_NO_CONTROLLER,
        ))),
    }
}

/// Why a controller link or listener cannot use an [`Address::Nats`].
const NATS_NO_CONTROLLER: &str = "a NATS cluster has no controller: reach it with nats(..)";

/// The socket addresses of `host`. An IP address is used as it is; a name is looked up
/// on a short-lived thread of its own, not on tokio's blocking pool (where tokio looks
/// names up), so that connecting never waits behind blocking work: the user's
/// `spawn_blocking`, or anything else that fills the pool. Callers bound the wait; a
/// lookup that outlives it ends on its own (the system resolver has its own timeouts).
async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = host.to_string();
    std::thread::Builder::new()
        .name("daffi-resolve".into())
        .spawn(move || {
            let _ = tx.send((name.as_str(), port).to_socket_addrs().map(Vec::from_iter));
        })?;
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("the name lookup thread ended")))
}

/// A plaintext tokio stream, split into its reader and writer.
trait IntoHalves: Sized {
    /// On Unix, halves that register the socket for reading only (see [`split`]);
    /// elsewhere, tokio's.
    fn into_halves(self) -> io::Result<(BoxRead, BoxWrite)>;

    /// [`into_halves`](Self::into_halves) for a node's end of its link: on Unix, with
    /// its reads shared ([`SharedReads`]) if `share`.
    fn into_node_halves(self, share: bool) -> io::Result<Halves> {
        let _ = share;
        self.into_halves().map(Halves::unshared)
    }
}

impl IntoHalves for TcpStream {
    #[cfg(unix)]
    fn into_halves(self) -> io::Result<(BoxRead, BoxWrite)> {
        split::split(self.into_std()?)
    }

    #[cfg(unix)]
    fn into_node_halves(self, share: bool) -> io::Result<Halves> {
        split::node_halves(self.into_std()?, share)
    }

    #[cfg(not(unix))]
    fn into_halves(self) -> io::Result<(BoxRead, BoxWrite)> {
        let (r, w) = self.into_split();
        Ok((Box::new(r), Box::new(w)))
    }
}

#[cfg(unix)]
impl IntoHalves for tokio::net::UnixStream {
    fn into_halves(self) -> io::Result<(BoxRead, BoxWrite)> {
        split::split(self.into_std()?)
    }

    fn into_node_halves(self, share: bool) -> io::Result<Halves> {
        split::node_halves(self.into_std()?, share)
    }
}

/// What an in-process connection's peer is called in logs.
pub const IN_PROCESS_PEER: &str = "in-process";

/// A connection inside this process, for the node of the process that runs the
/// controller: the node's reader and writer, and the controller's side as an
/// [`Incoming`]. It has no address and no file: nothing another process could reach,
/// so it needs neither TLS nor a token.
///
/// On Unix it is an anonymous socket pair (`socketpair(2)`), not an in-memory pipe: a
/// sync caller (a thread outside the runtime) then wakes the controller's task through
/// the kernel, as on any socket, where waking it from memory costs tokio a second
/// worker's wake-up per frame (its "searching" hand-off). Measured with the
/// `roundtrip` example, a memory pipe made calls from such a node slower than a Unix
/// socket (p50 84 us against 45 us on a 2-core machine); the pair costs what the Unix
/// socket did, minus the path, its checks and the accept.
pub fn in_process(share_reads: bool) -> io::Result<(Halves, Incoming)> {
    let (node, controller) = pipe(share_reads)?;
    let incoming = Incoming {
        stream: controller,
        peer: IN_PROCESS_PEER.to_string(),
        in_process: true,
    };
    Ok((node, incoming))
}

#[cfg(unix)]
fn pipe(share_reads: bool) -> io::Result<(Halves, RawStream)> {
    let (node, controller) = std::os::unix::net::UnixStream::pair()?;
    node.set_nonblocking(true)?;
    controller.set_nonblocking(true)?;
    let controller = tokio::net::UnixStream::from_std(controller)?;
    Ok((
        split::node_halves(node, share_reads)?,
        RawStream::Unix(controller),
    ))
}

/// Bytes the in-memory pipe holds in each direction before its writer waits: one batch
/// of a connection's writer (see `protocol::io`).
#[cfg(not(unix))]
const IN_PROCESS_BUFFER: usize = 256 * 1024;

#[cfg(not(unix))]
fn pipe(_share_reads: bool) -> io::Result<(Halves, RawStream)> {
    let (node, controller) = tokio::io::duplex(IN_PROCESS_BUFFER);
    let (read, write) = tokio::io::split(node);
    Ok((
        Halves::unshared((Box::new(read), Box::new(write))),
        RawStream::InMemory(controller),
    ))
}

/// Why TLS and a Unix socket do not go together.
pub const UNIX_NO_TLS: &str =
    "TLS is for TCP; a Unix socket is protected by its file permissions (see docs/SECURITY.md)";

/// A bound listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain socket; the file is removed when the listener is dropped.
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, UnixSocketFile),
}

/// Connections the kernel completes and holds for the controller until it accepts them.
/// A mass start of nodes connects faster than the controller accepts; with mio's default
/// of 128, the kernel drops the connects past it, and each waits for its SYN to be sent
/// again (1 s, then 3 s). Linux caps it at `net.core.somaxconn` (4,096 by default since
/// 5.4), as it does the Unix socket's (mio asks the cap for that one).
const LISTEN_BACKLOG: u32 = 4_096;

/// Listens on the first of `addresses` that can be bound (as [`TcpListener::bind`]
/// does, with [`LISTEN_BACKLOG`]).
fn listen_tcp(addresses: &[SocketAddr]) -> io::Result<TcpListener> {
    let mut last_error = None;
    for address in addresses {
        match listen_tcp_on(*address) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the host name has no address")
    }))
}

fn listen_tcp_on(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As TcpListener::bind: a restarted controller gets its port back at once, though
    // connections of the last one linger (TIME_WAIT). On Windows the option would let
    // another process take the port over instead.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
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
    ///
    /// For a Unix socket: a missing directory is created owner-only (0700); an existing
    /// one that other users may write to (and that is not sticky, like `/tmp`) is refused,
    /// since they could replace the socket, and so is one that belongs to another user
    /// (not this one, nor root) or is a symbolic link ([`Error::UnsafeSocket`]). A
    /// stale socket file left by a dead controller
    /// is replaced; a live one is refused. The socket file is owner-only (0600) from the
    /// moment it appears at `path`, whatever the umask.
    pub async fn bind(address: &Address) -> Result<Listener> {
        let bind_err = |source| Error::Bind {
            address: address.to_string(),
            source,
        };
        match address {
            Address::Tcp { host, port } => {
                let addresses = resolve(host, *port).await.map_err(bind_err)?;
                let l = listen_tcp(&addresses).map_err(bind_err)?;
                Ok(Listener::Tcp(l))
            }
            #[cfg(unix)]
            Address::Unix(path) => {
                let dir = unix::socket_dir(path);
                prepare_socket_dir(dir).map_err(bind_err)?;
                unix::check_dir(dir).map_err(|why| Error::UnsafeSocket {
                    path: path.clone(),
                    message: format!("{why}; another user could replace the socket there: use a unix_sock_path in a directory you own"),
                })?;
                clear_stale_socket(path).await.map_err(bind_err)?;
                let l = unix::bind_owner_only(path).map_err(bind_err)?;
                Ok(Listener::Unix(l, UnixSocketFile(path.clone())))
            }
            #[cfg(not(unix))]
            Address::Unix(_) => Err(Error::Config(
                "Unix sockets are not available on this platform; use host and port".into(),
            )),
            Address::Nats(_) => Err(Error::Config(NATS_NO_CONTROLLER.into())),
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

    /// Accepts the next connection. Nothing is read from it yet: the TLS handshake (if
    /// any) happens in [`Incoming::open`], in the connection's own task and under its
    /// handshake deadline, so that a slow peer never holds up the accept loop.
    pub async fn accept(&self) -> io::Result<Incoming> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Incoming {
                    stream: RawStream::Tcp(stream),
                    peer: peer.to_string(),
                    in_process: false,
                })
            }
            #[cfg(unix)]
            Listener::Unix(l, file) => {
                let (stream, _) = l.accept().await?;
                let who = match stream.peer_cred() {
                    Ok(c) => match c.pid() {
                        Some(pid) => format!(" (uid {}, pid {pid})", c.uid()),
                        None => format!(" (uid {})", c.uid()),
                    },
                    Err(_) => String::new(),
                };
                Ok(Incoming {
                    stream: RawStream::Unix(stream),
                    peer: format!("unix:{}{who}", file.0.display()),
                    in_process: false,
                })
            }
        }
    }
}

/// An accepted connection from which nothing has been read.
pub struct Incoming {
    stream: RawStream,
    peer: String,
    /// Made by [`in_process`]: the peer is this process.
    in_process: bool,
}

enum RawStream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    /// The controller's end of [`in_process`] where there are no Unix sockets.
    #[cfg(not(unix))]
    InMemory(tokio::io::DuplexStream),
}

/// A connection ready for the protocol.
pub enum Opened {
    /// Under TLS when the listener has it, plaintext otherwise.
    Ready(BoxRead, BoxWrite),
    /// The listener requires TLS, but the peer began with something other than a TLS
    /// handshake. The plaintext halves let the protocol tell it so before closing.
    NotTls(BoxRead, BoxWrite),
}

impl Incoming {
    /// The same connection, its socket registered with the runtime this is called on
    /// (the controller moves each connection to the shard that serves it).
    pub fn register_here(self) -> io::Result<Incoming> {
        let stream = match self.stream {
            RawStream::Tcp(s) => RawStream::Tcp(TcpStream::from_std(s.into_std()?)?),
            #[cfg(unix)]
            RawStream::Unix(s) => RawStream::Unix(tokio::net::UnixStream::from_std(s.into_std()?)?),
            #[cfg(not(unix))]
            memory @ RawStream::InMemory(_) => memory,
        };
        Ok(Incoming { stream, ..self })
    }

    /// Who connected: the TCP peer address, the socket path with the peer's uid and
    /// pid on a Unix socket, or [`IN_PROCESS_PEER`].
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the peer is this process itself (see [`in_process`]).
    pub fn is_in_process(&self) -> bool {
        self.in_process
    }

    /// Runs the TLS handshake when `tls` is given (TCP only; a Unix socket and an
    /// in-process pipe are always plaintext). Callers bound it with their handshake
    /// deadline.
    pub async fn open(self, tls: Option<&ServerTls>) -> io::Result<Opened> {
        match (self.stream, tls) {
            (RawStream::Tcp(stream), None) => {
                let (r, w) = stream.into_halves()?;
                Ok(Opened::Ready(r, w))
            }
            (RawStream::Tcp(stream), Some(tls)) => {
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before the TLS handshake",
                    ));
                }
                if first[0] != TLS_HANDSHAKE_RECORD {
                    let (r, w) = stream.into_halves()?;
                    return Ok(Opened::NotTls(r, w));
                }
                let (r, w) = tls.accept(stream).await?;
                Ok(Opened::Ready(r, w))
            }
            #[cfg(unix)]
            (RawStream::Unix(stream), _) => {
                let (r, w) = stream.into_halves()?;
                Ok(Opened::Ready(r, w))
            }
            #[cfg(not(unix))]
            (RawStream::InMemory(stream), _) => {
                let (r, w) = tokio::io::split(stream);
                Ok(Opened::Ready(Box::new(r), Box::new(w)))
            }
        }
    }
}

/// Creates the socket's directory (owner-only), or checks that other users cannot
/// write to it.
#[cfg(unix)]
fn prepare_socket_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => unix::create_private_dir(dir),
        Err(e) => Err(e),
        Ok(meta) if !meta.is_dir() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not a directory", dir.display()),
        )),
        Ok(meta) => {
            let mode = meta.permissions().mode();
            let sticky = mode & 0o1000 != 0;
            if mode & 0o002 != 0 && !sticky {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the directory `{}` (mode {:o}) is writable by every user and not sticky: anyone could replace the socket; use a directory only you can write to (chmod 700)",
                        dir.display(),
                        mode & 0o7777
                    ),
                ));
            }
            if mode & 0o020 != 0 && !sticky {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o7777),
                    "the socket directory is group-writable: members of its group could replace the socket");
            }
            Ok(())
        }
    }
}

/// Clears a stale socket file left by a dead controller; refuses a live one, and
/// anything that is not a socket.
#[cfg(unix)]
async fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;

    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "`{}` exists and is not a socket; remove it or choose another unix_sock_path",
                path.display()
            ),
        ));
    }
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::UnixStream::connect(path),
    )
    .await;
    match probe {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale socket file");
            std::fs::remove_file(path)
        }
        Ok(Err(e)) => Err(e),
        // Connected, or so busy it did not answer: a controller lives there.
        Ok(Ok(_)) | Err(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a live controller already listens on this socket",
        )),
    }
}

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    /// The directory a socket path is in (`.` for a bare file name).
    pub fn socket_dir(path: &Path) -> &Path {
        path.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."))
    }

    /// This process's user.
    fn own_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// Whether `uid` may own a socket, its directory, or the process behind it: this
    /// process's user, or root (who can do anything anyway).
    fn trusted(uid: u32) -> bool {
        uid == 0 || uid == own_uid()
    }

    fn not_yours(what: &str, uid: u32) -> String {
        format!(
            "{what} belongs to uid {uid}, not to you (uid {}) or root",
            own_uid()
        )
    }

    /// Why another user may control `dir`, if one may: it belongs to another user, or
    /// it is a symbolic link (whoever can change the link decides where sockets are).
    /// A directory that does not exist is not refused here.
    pub fn check_dir(dir: &Path) -> Result<(), String> {
        let Ok(meta) = std::fs::symlink_metadata(dir) else {
            return Ok(());
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(dir)
                .map(|t| format!(" to `{}`", t.display()))
                .unwrap_or_default();
            return Err(format!(
                "its directory `{}` is a symbolic link{target}",
                dir.display()
            ));
        }
        if !trusted(meta.uid()) {
            return Err(not_yours(
                &format!("its directory `{}`", dir.display()),
                meta.uid(),
            ));
        }
        Ok(())
    }

    /// Before connecting: why another user may have put the socket at `path`, if one
    /// may. A missing socket is not refused here (connecting reports it).
    pub fn check_socket(path: &Path) -> Result<(), String> {
        check_dir(socket_dir(path))?;
        match std::fs::metadata(path) {
            Ok(meta) if !trusted(meta.uid()) => Err(not_yours("the socket", meta.uid())),
            _ => Ok(()),
        }
    }

    /// After connecting: whether the process that listens runs as this user or root.
    pub fn check_peer(stream: &tokio::net::UnixStream) -> Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("cannot tell which user listens on it ({e})"))?;
        if trusted(cred.uid()) {
            return Ok(());
        }
        let pid = cred
            .pid()
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        Err(not_yours(
            &format!("the process listening on it{pid}"),
            cred.uid(),
        ))
    }

    /// Creates `dir` (and missing parents) with mode 0700, whatever the umask.
    pub fn create_private_dir(dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Binds a socket that is owner-only from the moment it appears at `path`: it is
    /// bound in a private staging directory, restricted to 0600, then hard-linked into
    /// place (which fails, rather than replaces, if another controller got there first).
    /// Where that is impossible (a path near the length limit, a file system without
    /// hard links) it binds in place and restricts the file right after.
    pub fn bind_owner_only(path: &Path) -> io::Result<tokio::net::UnixListener> {
        match bind_staged(path) {
            Ok(l) => Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another controller bound this socket at the same moment",
            )),
            Err(e) => {
                tracing::debug!(error = %e, "staged bind failed; binding in place");
                let l = tokio::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(l)
            }
        }
    }

    fn bind_staged(path: &Path) -> io::Result<tokio::net::UnixListener> {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let staging = dir.join(format!(
            ".daffi-bind-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        let staged = staging.join("s");
        let bound = (|| {
            let l = tokio::net::UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::hard_link(&staged, path)?;
            Ok(l)
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        bound
    }
}
