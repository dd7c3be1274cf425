//! `switchyard certs`.

use std::path::PathBuf;

use anyhow::Context;
use switchyard_common::tls::{self, Role};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Folder to write into: ca.pem and ca-key.pem, then ROLE.pem and ROLE-key.pem for the
    /// coordinator, worker and client roles (keys readable by their owner only).
    #[arg(long, env = "SWITCHYARD_CERTS_OUT", default_value = "certs")]
    pub out: PathBuf,

    /// DNS names and IP addresses the servers are dialled by, which their certificates must name
    /// (comma-separated; e.g. add `*.switchyard-workers.default.svc` for the Helm chart's workers).
    #[arg(long, env = "SWITCHYARD_CERTS_HOSTS", value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,

    /// Also a worker certificate of its own for each of these names (NAME.pem, NAME-key.pem;
    /// comma-separated): the coordinator binds each worker id to the certificate that registered
    /// it, so with one certificate per worker no worker can heartbeat or drain another's id.
    #[arg(long, env = "SWITCHYARD_CERTS_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    tls::write_dev_certs(&args.out, &args.hosts, &args.workers)
        .with_context(|| format!("writing certificates to {}", args.out.display()))?;
    println!("wrote a development CA and one certificate per role to {}", args.out.display());
    for role in Role::ALL {
        let files = tls::dev_files(&args.out, role);
        println!(
            "  {:<12} --tls-cert {} --tls-key {} --tls-ca {}",
            role.name(),
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        );
    }
    for name in &args.workers {
        let files = tls::named_worker_files(&args.out, name);
        println!(
            "  {name:<12} --tls-cert {} --tls-key {} --tls-ca {}",
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        );
    }
    println!("valid for: {}", args.hosts.join(", "));
    Ok(())
}
