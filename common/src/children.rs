//! Child processes that never outlive their parent: `switchyard local` and the integration tests
//! start coordinators and workers with [`ChildProcess::spawn`]. A child is killed when its handle is
//! dropped (a test that fails, a Ctrl-C) and, through `PR_SET_PDEATHSIG`, when the parent dies
//! without running destructors (SIGKILL).
//!
//! Each child runs in a session of its own, as a separate service or machine would: where the
//! kernel schedules by session (autogroup, on by default), each process gets its fair share of the
//! cores instead of each thread, so the threads of one process (a client writing two workers'
//! dispatches) do not crowd out another woken by its bytes. On this project's 2-core machine,
//! DeepEP low-latency with 2 workers behind 10 Gbit/s links: dispatch 79-90% of the line rate
//! (mean 86%, eight runs) against 76-88% (mean 83%) with every process in one session. A
//! terminal's Ctrl-C reaches only the parent, which stops its children itself.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::ready;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("starting {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{program} exited before it was ready ({status})")]
    ExitedEarly { program: String, status: String },
    #[error("{program} printed no readiness line within {after:?}")]
    NotReady { program: String, after: Duration },
}

/// A running child process with the addresses it announced.
#[derive(Debug)]
pub struct ChildProcess {
    pub name: String,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    child: Child,
}

impl ChildProcess {
    /// Starts `program` with `args` and `envs`, waits for its readiness line, then drains its stdout.
    /// Its stderr (logs) goes to ours.
    pub async fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        ready_within: Duration,
    ) -> Result<Self, ChildError> {
        Self::spawn_in(None, name, program, args, envs, ready_within).await
    }

    /// [`ChildProcess::spawn`] in the network namespace whose file is `namespace` (e.g.
    /// `/run/netns/NAME`), when given: the child's sockets are that namespace's.
    pub async fn spawn_in(
        namespace: Option<&Path>,
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        ready_within: Duration,
    ) -> Result<Self, ChildError> {
        let display = program.display().to_string();
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(envs.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        own_session(&mut command);
        let spawn_error = |source| ChildError::Spawn { program: display.clone(), source };
        // Open until the child has exec'd (close-on-exec): `setns` takes its descriptor.
        let namespace = namespace.map(std::fs::File::open).transpose().map_err(spawn_error)?;
        if let Some(namespace) = &namespace {
            enter_namespace(&mut command, namespace);
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        drop(namespace);
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let announced = tokio::time::timeout(ready_within, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addresses) = ready::parse(&line) {
                    return Some(addresses);
                }
            }
            None
        })
        .await;
        let (grpc, metrics) = match announced {
            Ok(Some(addresses)) => addresses,
            Ok(None) => {
                let status = child.wait().await.map_or_else(|error| error.to_string(), |status| status.to_string());
                return Err(ChildError::ExitedEarly { program: display, status });
            }
            Err(_) => {
                return Err(ChildError::NotReady { program: display, after: ready_within });
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { name: name.to_owned(), grpc, metrics, child })
    }

    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Its process id; `None` once it has been waited for.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, as a crash would: no drain, no goodbye.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Its resident memory in bytes (Linux: `VmRSS` of `/proc/PID/status`); `None` once it exited.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGSTOP: the process is frozen, its sockets still open (a hung host, a long GC pause).
    pub fn pause(&self) {
        if let Some(pid) = self.child.id() {
            send_signal(pid, Signal::Stop);
        }
    }

    /// SIGCONT after [`ChildProcess::pause`].
    pub fn resume(&self) {
        if let Some(pid) = self.child.id() {
            send_signal(pid, Signal::Continue);
        }
    }

    /// SIGTERM, and waits up to `grace` for the process to exit; true if it did.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        if let Some(pid) = self.child.id() {
            send_signal(pid, Signal::Terminate);
            return tokio::time::timeout(grace, self.child.wait()).await.is_ok();
        }
        true
    }

    /// SIGTERM, then SIGKILL if the child is still there after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if !self.terminate(grace).await {
            self.kill().await;
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

#[cfg(unix)]
#[allow(unsafe_code)]
fn own_session(command: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn own_session(_command: &mut Command) {}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn enter_namespace(command: &mut Command, namespace: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let descriptor = namespace.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the descriptor stays open until the child has exec'd.
    unsafe {
        command.pre_exec(move || enter_network_namespace(descriptor));
    }
}

#[cfg(not(target_os = "linux"))]
fn enter_namespace(_command: &mut Command, _namespace: &std::fs::File) {}

/// Moves the calling thread (only it) into the network namespace open as `descriptor` (a file
/// under `/run/netns`): the sockets it opens from then on are that namespace's.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn enter_network_namespace(descriptor: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns reads nothing of ours and changes only the calling thread's namespace.
    if unsafe { libc::setns(descriptor, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Terminate,
    Stop,
    Continue,
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: Signal) {
    let signal = match signal {
        Signal::Terminate => libc::SIGTERM,
        Signal::Stop => libc::SIGSTOP,
        Signal::Continue => libc::SIGCONT,
    };
    // SAFETY: kill(2) on a pid we own; a stale pid is at worst an ESRCH error we ignore.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

#[cfg(not(unix))]
fn send_signal(_pid: u32, _signal: Signal) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(unsafe_code)]
    async fn a_child_leads_a_session_of_its_own() {
        let announce =
            format!("echo {} grpc=127.0.0.1:1 metrics=127.0.0.1:2; exec sleep 30", crate::ready::READY_PREFIX);
        let args = ["-c".to_owned(), announce];
        let mut child = ChildProcess::spawn("sh", Path::new("/bin/sh"), &args, &[], Duration::from_secs(10))
            .await
            .expect("a shell that announces itself");
        let pid = child.child.id().expect("running") as libc::pid_t;
        // SAFETY: getsid only reads the kernel's view of a process.
        let (childs, ours) = unsafe { (libc::getsid(pid), libc::getsid(0)) };
        child.kill().await;
        assert_eq!(childs, pid, "the child leads its session");
        assert_ne!(childs, ours);
    }

    /// A shell that runs `first`, announces itself, then waits (itself: no `exec`, so that it is
    /// the same process from its announcement on).
    async fn announcing(first: &str) -> ChildProcess {
        let announce = format!(
            "{first}; echo {} grpc=127.0.0.1:7 metrics=127.0.0.1:8; while :; do sleep 1; done",
            crate::ready::READY_PREFIX
        );
        let args = ["-c".to_owned(), announce];
        ChildProcess::spawn("sh", Path::new("/bin/sh"), &args, &[], Duration::from_secs(10))
            .await
            .expect("a shell that announces itself")
    }

    /// The state letter of process `pid` in `/proc/PID/stat`; `'?'` once it is gone.
    fn state_of(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The command name in parentheses may hold spaces: the state follows its `)`.
        stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).unwrap_or('?')
    }

    /// The state letter of process `pid` once it is one of `wanted` (within a few seconds).
    async fn pid_state_becomes(pid: u32, wanted: &[char]) -> char {
        let mut state = '?';
        for _ in 0..500 {
            state = state_of(pid);
            if wanted.contains(&state) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        state
    }

    /// The state letter of `child` once it is one of `wanted` (within a few seconds).
    async fn state_becomes(child: &ChildProcess, wanted: &[char]) -> char {
        pid_state_becomes(child.child.id().expect("running"), wanted).await
    }

    /// A parent killed outright runs no destructor: its children go with the thread that started
    /// them all the same (here a thread that ends with its child's handle forgotten).
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn a_child_dies_with_the_thread_that_started_it() {
        let pid = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            let child = runtime.block_on(announcing("true"));
            let pid = child.child.id().expect("running");
            std::mem::forget(child);
            pid
        })
        .join()
        .expect("the starting thread");
        let dead = ['Z', '?'];
        let state = pid_state_becomes(pid, &dead).await;
        if !dead.contains(&state) {
            // SAFETY: kill(2) on the child this test started, still running.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        assert!(dead.contains(&state), "the child is still running (state {state}) after its parent thread ended");
    }

    #[test]
    fn entering_a_network_namespace_refuses_a_file_that_is_none() {
        use std::os::fd::AsRawFd;
        let not_a_namespace = std::fs::File::open("/dev/null").expect("/dev/null");
        let refused = enter_network_namespace(not_a_namespace.as_raw_fd()).expect_err("/dev/null is no namespace");
        assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
    }

    #[tokio::test]
    async fn a_child_is_announced_measured_paused_resumed_and_terminated() {
        let mut child = announcing("true").await;
        assert_eq!((child.grpc_uri(), child.metrics.port()), ("http://127.0.0.1:7".to_owned(), 8));
        let rss = child.rss_bytes().expect("a running child's resident memory");
        assert!(rss >= 64 * 1024 && rss.is_multiple_of(1024), "{rss} bytes");
        child.pause();
        assert_eq!(state_becomes(&child, &['T']).await, 'T', "stopped");
        child.resume();
        assert_eq!(state_becomes(&child, &['S']).await, 'S', "sleeping again");
        assert!(child.terminate(Duration::from_secs(10)).await, "the shell ends on SIGTERM");
        assert_eq!(child.rss_bytes(), None, "an exited child has no memory");
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_after_its_grace() {
        let mut child = announcing("trap '' TERM").await;
        assert!(!child.terminate(Duration::from_millis(200)).await, "SIGTERM is ignored");
        assert!(child.rss_bytes().is_some(), "still running");
        child.stop(Duration::from_millis(200)).await;
        assert_eq!(child.rss_bytes(), None, "killed");
        let mut killed = announcing("true").await;
        killed.kill().await;
        assert_eq!(killed.rss_bytes(), None);
    }

    #[tokio::test]
    async fn a_child_that_never_announces_itself_fails_by_name() {
        let spawn = |script: &str, within: Duration| {
            let args = ["-c".to_owned(), script.to_owned()];
            async move { ChildProcess::spawn("sh", Path::new("/bin/sh"), &args, &[], within).await }
        };
        let exited = spawn("exit 3", Duration::from_secs(10)).await.expect_err("exits without a readiness line");
        assert_eq!(exited.to_string(), "/bin/sh exited before it was ready (exit status: 3)");
        let silent = spawn("exec sleep 30", Duration::from_millis(200)).await.expect_err("never ready");
        assert_eq!(silent.to_string(), "/bin/sh printed no readiness line within 200ms");
        let missing = ChildProcess::spawn("x", Path::new("/nonexistent/x"), &[], &[], Duration::from_secs(1)).await;
        assert!(missing.expect_err("no such program").to_string().starts_with("starting /nonexistent/x: "));
    }
}
