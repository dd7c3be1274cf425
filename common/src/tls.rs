//! Mutual TLS between the processes, and who is calling.
//!
//! Every process holds one certificate, signed by the cluster's CA, whose subject alternative
//! names include a URI naming its role (`spiffe://switchyard/coordinator`, `…/worker`,
//! `…/client`): both ends of a connection present theirs and check the other's against the CA
//! (rustls, ring). [`ServerTls`] and [`ClientTls`] re-read their PEM files when they change
//! (Kubernetes updates a mounted Secret in place), keeping the last good configuration if the new
//! files do not load. A server's accepted connections carry the peer's [`PeerIdentity`]
//! ([`TlsConnection`]), which [`authorize`] checks against the roles a method allows.
//! [`write_dev_certs`] makes a development CA and a certificate per role.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::http::Request;

use crate::around_call::{Answered, AroundCall};

/// A process's part in the cluster, as its certificate names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Worker,
    Client,
}

/// The scheme and authority of the role URIs.
const ROLE_URI_PREFIX: &str = "spiffe://switchyard/";

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Client];

    pub fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }

    /// The subject alternative name URI that gives a certificate this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }

    fn from_uri(uri: &str) -> Option<Role> {
        let name = uri.strip_prefix(ROLE_URI_PREFIX)?;
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_owned(), reason: reason.to_string() }
}

/// One identity's PEM files and the CA it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Its certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificates that sign its peers.
    pub ca: PathBuf,
}

impl TlsFiles {
    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let chain: Vec<_> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|error| file_error(&self.cert, error))?
            .collect::<Result<_, _>>()
            .map_err(|error| file_error(&self.cert, error))?;
        if chain.is_empty() {
            return Err(file_error(&self.cert, "holds no certificate"));
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(&self.key).map_err(|error| file_error(&self.key, error))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(&self.ca).map_err(|error| file_error(&self.ca, error))? {
            let certificate = certificate.map_err(|error| file_error(&self.ca, error))?;
            roots.add(certificate).map_err(|error| file_error(&self.ca, error))?;
        }
        if roots.is_empty() {
            return Err(file_error(&self.ca, "holds no CA certificate"));
        }
        Ok(Arc::new(roots))
    }

    /// When each file last changed: a new stamp means reloading.
    fn stamp(&self) -> Option<[SystemTime; 3]> {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok();
        Some([modified(&self.cert)?, modified(&self.key)?, modified(&self.ca)?])
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC runs over HTTP/2 only.
fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(files.roots()?, provider())
        .build()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(files.chain()?, files.key()?)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(files.roots()?)
        .with_client_auth_cert(files.chain()?, files.key()?)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

/// A configuration built from files, built again when they change.
#[derive(Debug)]
struct Reloading<C> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<Arc<C>, TlsError>,
    current: Mutex<(Option<[SystemTime; 3]>, Arc<C>)>,
}

impl<C> Reloading<C> {
    fn load(files: TlsFiles, build: fn(&TlsFiles) -> Result<Arc<C>, TlsError>) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = build(&files)?;
        Ok(Self { files, build, current: Mutex::new((stamp, config)) })
    }

    /// The configuration for a new connection: rebuilt first if a file changed since; the last
    /// good one if the new files do not load (a Secret half-updated, say).
    fn get(&self) -> Arc<C> {
        let mut current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let stamp = self.files.stamp();
        if stamp.is_some() && stamp != current.0 {
            match (self.build)(&self.files) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                    *current = (stamp, config);
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS certificates changed but do not load; keeping the previous ones")
                }
            }
        }
        current.1.clone()
    }
}

/// A server's TLS: it presents its certificate and requires one from every client.
#[derive(Debug, Clone)]
pub struct ServerTls(Arc<Reloading<ServerConfig>>);

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(Reloading::load(files, server_config)?)))
    }

    /// Completes the handshake on an accepted `stream`: the connection and who is at its other end.
    pub async fn accept<IO>(&self, stream: IO) -> std::io::Result<TlsConnection<tokio_rustls::server::TlsStream<IO>>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio_rustls::TlsAcceptor::from(self.0.get()).accept(stream).await?;
        let identity = PeerIdentity::of(stream.get_ref().1.peer_certificates());
        Ok(TlsConnection { inner: stream, identity })
    }
}

/// A client's TLS: it presents its certificate and checks the server's.
#[derive(Debug, Clone)]
pub struct ClientTls(Arc<Reloading<ClientConfig>>);

impl ClientTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(Reloading::load(files, client_config)?)))
    }

    /// Completes the handshake with the server `host` (a DNS name or an IP address, which its
    /// certificate must name) on a connected `stream`.
    pub async fn connect<IO>(&self, host: &str, stream: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {error}")))?;
        tokio_rustls::TlsConnector::from(self.0.get()).connect(name, stream).await
    }
}

/// Who is at the other end of a connection, as its (CA-checked) certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The roles its certificate's URIs name.
    pub roles: Vec<Role>,
    /// Its leaf certificate (DER): what a worker id registered over this connection is bound to.
    pub certificate: Vec<u8>,
}

impl PeerIdentity {
    fn of(certificates: Option<&[CertificateDer<'_>]>) -> Self {
        let Some(leaf) = certificates.and_then(<[_]>::first) else {
            return Self { roles: Vec::new(), certificate: Vec::new() };
        };
        Self { roles: roles_of(leaf), certificate: leaf.to_vec() }
    }
}

fn roles_of(certificate: &[u8]) -> Vec<Role> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else { return Vec::new() };
    let Ok(Some(names)) = parsed.subject_alternative_name() else { return Vec::new() };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Role::from_uri(uri),
            _ => None,
        })
        .collect()
}

/// A server's side of a TLS connection, with the peer's identity for every request on it.
#[derive(Debug)]
pub struct TlsConnection<IO> {
    inner: IO,
    identity: PeerIdentity,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> tonic::transport::server::Connected for TlsConnection<IO> {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TlsConnection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_to_inner!(impl [IO: AsyncWrite + Unpin] for TlsConnection<IO>);

/// `--tls-cert`, `--tls-key`, `--tls-ca`: all three (mutual TLS on every connection the process
/// serves and opens) or none (plaintext).
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate chain (PEM, leaf first), naming its role in a
    /// `spiffe://switchyard/ROLE` URI (`switchyard certs` writes a development set). With
    /// --tls-key and --tls-ca, every connection it serves or opens is mutual TLS, and each call is
    /// checked against the caller's role. Re-read when the files change.
    #[arg(long, global = true, env = "SWITCHYARD_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true, env = "SWITCHYARD_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) that sign this cluster's processes: peers whose certificates
    /// they do not sign are refused in the handshake.
    #[arg(long, global = true, env = "SWITCHYARD_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Serve plaintext, without TLS or any check of who calls: anyone who reaches the port can
    /// load, unload or register. A server refuses to start with neither this nor the TLS flags.
    #[arg(long, global = true, env = "SWITCHYARD_INSECURE", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
}

#[cfg(feature = "clap")]
impl TlsArgs {
    /// The files, when TLS is asked for.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles { cert: self.tls_cert.clone()?, key: self.tls_key.clone()?, ca: self.tls_ca.clone()? })
    }

    /// What a server runs: TLS with these files, or plaintext when `--insecure` says so; neither
    /// is an error naming both choices.
    pub fn server_mode(&self) -> Result<Option<TlsFiles>, TlsError> {
        match (self.files(), self.insecure) {
            (Some(files), _) => Ok(Some(files)),
            (None, true) => Ok(None),
            (None, false) => Err(TlsError::Config(
                "no --tls-cert, --tls-key and --tls-ca (SWITCHYARD_TLS_*): give them (`switchyard certs` writes a \
                 development set), or --insecure to serve plaintext to anyone who can reach the port"
                    .to_owned(),
            )),
        }
    }

    /// The flags that give a child process `files`.
    pub fn flags(files: &TlsFiles) -> Vec<String> {
        let flag = |name: &str, path: &Path| [name.to_owned(), path.display().to_string()];
        [flag("--tls-cert", &files.cert), flag("--tls-key", &files.key), flag("--tls-ca", &files.ca)].concat()
    }
}

/// The identity this process presents on the connections it opens.
static OUTGOING: std::sync::OnceLock<ClientTls> = std::sync::OnceLock::new();

/// Makes `tls` the identity this process presents on every connection it opens
/// ([`crate::transport::channel`], [`crate::transport::counted_h2_channel`]): a process has one role
/// in the cluster, so its clients (to the coordinator, to workers) need not each be told. Set it
/// once, before the first connection; `false` if it was set already.
pub fn use_for_outgoing(tls: ClientTls) -> bool {
    OUTGOING.set(tls).is_ok()
}

/// The identity set by [`use_for_outgoing`], if any.
pub fn outgoing() -> Option<&'static ClientTls> {
    OUTGOING.get()
}

/// Which roles may call a method, by its gRPC path (`/package.Service/Method`).
pub type RolePolicy = fn(&str) -> &'static [Role];

/// Answers every call whose caller's certificate names none of the roles the policy allows for
/// its method with `PERMISSION_DENIED` (`UNAUTHENTICATED` without a certificate), before the
/// method sees it. Used only on servers that run TLS.
#[derive(Debug, Clone, Copy)]
pub struct GuardRoles(pub RolePolicy);

impl AroundCall for GuardRoles {
    fn around<B, E: 'static>(
        &self,
        request: Request<B>,
        handle: impl FnOnce(Request<B>) -> Answered<E>,
    ) -> Answered<E> {
        let allowed = (self.0)(request.uri().path());
        match authorize(request.extensions(), allowed) {
            Ok(_) => handle(request),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The caller's identity if its certificate names one of `allowed`: `UNAUTHENTICATED` for a
/// connection without one (not TLS), `PERMISSION_DENIED` naming the roles that may call.
pub fn authorize(extensions: &tonic::Extensions, allowed: &[Role]) -> Result<PeerIdentity, tonic::Status> {
    let Some(identity) = extensions.get::<PeerIdentity>().cloned() else {
        return Err(tonic::Status::unauthenticated("this server takes calls over mutual TLS only"));
    };
    if identity.roles.iter().any(|role| allowed.contains(role)) {
        return Ok(identity);
    }
    let allowed: Vec<&str> = allowed.iter().map(|role| role.name()).collect();
    let held: Vec<&str> = identity.roles.iter().map(|role| role.name()).collect();
    Err(tonic::Status::permission_denied(format!(
        "only the {} role may call this; the caller's certificate names {}",
        allowed.join(" or "),
        if held.is_empty() { "no role".to_owned() } else { held.join(", ") }
    )))
}

/// The file names [`write_dev_certs`] writes in its folder.
pub fn dev_files(dir: &Path, role: Role) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{}.pem", role.name())),
        key: dir.join(format!("{}-key.pem", role.name())),
        ca: dir.join("ca.pem"),
    }
}

/// The files of the worker certificate [`write_dev_certs`] writes for `name`.
pub fn named_worker_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}-key.pem")), ca: dir.join("ca.pem") }
}

/// Writes a development CA (`ca.pem`, `ca-key.pem`) and, for each role, a certificate it signs
/// (`ROLE.pem`, `ROLE-key.pem`) naming the role and valid for `hosts` (DNS names or IP
/// addresses the servers are dialled by); then a worker certificate of its own for each of
/// `workers` (`NAME.pem`, `NAME-key.pem`), so that each worker's id is bound to its own
/// certificate rather than the role's. Keys are written readable by their owner only.
pub fn write_dev_certs(dir: &Path, hosts: &[String], workers: &[String]) -> Result<(), TlsError> {
    if let Some(bad) = workers.iter().find(|name| {
        name.is_empty()
            || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || name.as_str() == "ca"
            || Role::ALL.iter().any(|role| role.name() == name.as_str())
    }) {
        return Err(TlsError::Config(format!(
            "worker name {bad:?}: lowercase letters, digits and '-' only, and not a role's or the CA's file name"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|error| file_error(dir, error))?;
    let key = rcgen::KeyPair::generate()?;
    let ca = dev_ca_params()?.self_signed(&key)?;
    let issuer = rcgen::Issuer::new(dev_ca_params()?, key);
    write(&dir.join("ca.pem"), &ca.pem(), false)?;
    write(&dir.join("ca-key.pem"), &issuer.key().serialize_pem(), true)?;
    let named = workers.iter().map(|name| (Role::Worker, name.as_str(), named_worker_files(dir, name)));
    let roles = Role::ALL.into_iter().map(|role| (role, role.name(), dev_files(dir, role)));
    for (role, name, files) in roles.chain(named) {
        issue(&issuer, &ca.pem(), role, name, hosts, &files)?;
    }
    Ok(())
}

/// Writes a certificate for one process into `out` (`<name>.pem`, `<name>-key.pem`), signed by
/// the development CA [`write_dev_certs`] wrote into `ca_dir`, naming `role` and valid for
/// `hosts`: a server's certificate must name the address it is dialled by, which for hosts made
/// at start (network namespaces) is known only then.
pub fn write_host_certificate(
    ca_dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    out: &Path,
) -> Result<TlsFiles, TlsError> {
    let read = |file: &str| {
        let path = ca_dir.join(file);
        std::fs::read_to_string(&path).map_err(|error| file_error(&path, error))
    };
    let (ca_pem, ca_key) = (read("ca.pem")?, read("ca-key.pem")?);
    let issuer = rcgen::Issuer::new(dev_ca_params()?, rcgen::KeyPair::from_pem(&ca_key)?);
    std::fs::create_dir_all(out).map_err(|error| file_error(out, error))?;
    let files = TlsFiles {
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}-key.pem")),
        ca: ca_dir.join("ca.pem"),
    };
    issue(&issuer, &ca_pem, role, name, hosts, &files)?;
    Ok(files)
}

/// The development CA's parameters: the same every time, so that its key alone signs more
/// certificates later ([`write_host_certificate`]) that chain to the certificate written first.
fn dev_ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "switchyard development CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Signs a certificate for `role` valid for `hosts` and writes it (followed by the CA's, `ca_pem`)
/// and its key to `files`.
fn issue(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    role: Role,
    name: &str,
    hosts: &[String],
    files: &TlsFiles,
) -> Result<(), TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, format!("switchyard {} {name}", role.name()));
    let uri = role.uri().try_into().map_err(|_| TlsError::Config(format!("{} is no IA5 string", role.uri())))?;
    params.subject_alt_names.push(SanType::URI(uri));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, issuer)?;
    write(&files.cert, &(certificate.pem() + ca_pem), false)?;
    write(&files.key, &key.serialize_pem(), true)
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|error| file_error(path, error))?;
    file.write_all(contents.as_bytes()).map_err(|error| file_error(path, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "configuration" that is the certificate file's text, refused when it says so.
    fn cert_text(files: &TlsFiles) -> Result<Arc<String>, TlsError> {
        let text = std::fs::read_to_string(&files.cert).map_err(|error| TlsError::Config(error.to_string()))?;
        if text == "refused" {
            return Err(TlsError::Config("refused".into()));
        }
        Ok(Arc::new(text))
    }

    /// Certificates are built again only when a file changed, and a change that does not load
    /// (or a file gone missing, as a Secret is while it is replaced) keeps the last good ones.
    #[test]
    fn certificates_reload_when_their_files_change_and_only_then() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = TlsFiles { cert: dir.path().join("cert"), key: dir.path().join("key"), ca: dir.path().join("ca") };
        let write = |path: &Path, text: &str, seconds_later: u64| {
            std::fs::write(path, text).expect("write");
            let file = std::fs::File::options().write(true).open(path).expect("open");
            file.set_modified(SystemTime::now() + std::time::Duration::from_secs(seconds_later)).expect("set mtime");
        };
        for path in [&files.cert, &files.key, &files.ca] {
            write(path, "first", 0);
        }
        let reloading = Reloading::load(files.clone(), cert_text).expect("loads");
        let first = reloading.get();
        assert!(Arc::ptr_eq(&first, &reloading.get()), "unchanged files are not built again");
        write(&files.cert, "second", 10);
        assert_eq!(*reloading.get(), "second");
        write(&files.cert, "refused", 20);
        assert_eq!(*reloading.get(), "second", "the last good certificates stay");
        write(&files.cert, "third", 30);
        std::fs::remove_file(&files.key).expect("remove");
        assert_eq!(*reloading.get(), "second", "nothing is built while a file is missing");
        write(&files.key, "key", 40);
        assert_eq!(*reloading.get(), "third");
    }

    #[cfg(feature = "clap")]
    #[test]
    fn a_server_runs_tls_with_all_three_files_plaintext_when_told_and_refuses_neither() {
        use clap::Parser;

        #[derive(Parser)]
        struct Command {
            #[command(flatten)]
            tls: TlsArgs,
        }
        let parse = |flags: &[&str]| Command::try_parse_from(["server"].iter().chain(flags)).map(|command| command.tls);
        let neither = parse(&[]).expect("no flags parse").server_mode().expect_err("neither TLS nor --insecure");
        assert!(neither.to_string().contains("--insecure") && neither.to_string().contains("--tls-cert"), "{neither}");
        assert_eq!(parse(&["--insecure"]).expect("parses").server_mode().expect("plaintext"), None);
        let flags = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"];
        let files = parse(&flags).expect("parses").server_mode().expect("TLS").expect("its files");
        assert_eq!(
            (files.cert.to_str(), files.key.to_str(), files.ca.to_str()),
            (Some("c.pem"), Some("k.pem"), Some("ca.pem"))
        );
        assert_eq!(TlsArgs::flags(&files), flags, "what a child process is given");
        assert!(parse(&["--tls-cert", "c.pem"]).is_err(), "one file alone is refused");
        assert!(parse(&["--insecure", "--tls-cert", "c.pem", "--tls-key", "k", "--tls-ca", "a"]).is_err());
    }

    #[test]
    fn role_uris_round_trip_and_others_name_no_role() {
        for role in Role::ALL {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        assert_eq!(Role::from_uri("spiffe://switchyard/admin"), None);
        assert_eq!(Role::from_uri("spiffe://elsewhere/worker"), None);
    }

    #[test]
    fn dev_certificates_name_their_role() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_dev_certs(dir.path(), &["localhost".into(), "127.0.0.1".into()], &["w-0".into()]).expect("certificates");
        let own = named_worker_files(dir.path(), "w-0").chain().expect("a worker's own certificate");
        assert_eq!(roles_of(&own[0]), [Role::Worker]);
        assert_ne!(own[0], dev_files(dir.path(), Role::Worker).chain().expect("the role's")[0]);
        assert!(write_dev_certs(dir.path(), &[], &["../etc".into()]).is_err(), "names stay in the folder");
        assert!(write_dev_certs(dir.path(), &[], &["client".into()]).is_err(), "nor replace a role's files");
        for role in Role::ALL {
            let files = dev_files(dir.path(), role);
            let chain = files.chain().expect("chain");
            assert_eq!(chain.len(), 2, "leaf, then the CA");
            assert_eq!(roles_of(&chain[0]), [role]);
            assert!(ServerTls::load(files.clone()).is_ok() && ClientTls::load(files.clone()).is_ok());
            let h2 = [b"h2".to_vec()];
            assert_eq!(server_config(&files).expect("server").alpn_protocols, h2, "gRPC is HTTP/2 only");
            assert_eq!(client_config(&files).expect("client").alpn_protocols, h2);
        }
        let key_mode = std::fs::metadata(dev_files(dir.path(), Role::Worker).key).expect("key").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777, 0o600);
        let missing = TlsFiles { ca: dir.path().join("nope.pem"), ..dev_files(dir.path(), Role::Client) };
        let error = ServerTls::load(missing).unwrap_err().to_string();
        assert!(error.contains("nope.pem"), "{error}");
    }
}
