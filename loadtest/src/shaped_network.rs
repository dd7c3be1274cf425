//! A cluster network on one machine: each host (the coordinator, every worker) in its own Linux
//! network namespace with its own address, all joined by a bridge in a "switch" namespace to this
//! process's namespace (the client's), each worker's link shaped by `tbf` to a rate in both
//! directions. Expert parallelism's communication cost then meets a real link rate instead of
//! loopback's, and the cluster runs across distinct addresses as it does across machines.
//!
//! ```text
//!  client (this namespace)        switch namespace                  host namespaces
//!  sy<tag>c 198.18.N.1 ──veth── c ─┐
//!                                  ├─ br0 ─ coordinator ──veth── eth0 198.18.N.2
//!                                  ├─ br0 ─ w0 ═tbf═ veth ═tbf═ eth0 198.18.N.3
//!                                  └─ br0 ─ w1 ═tbf═ veth ═tbf═ eth0 198.18.N.4
//! ```
//!
//! Every host's TCP towards the others runs one congestion control ([`CongestionControl`], a
//! `congctl` on its route to the network), CUBIC unless told otherwise, whatever this machine's own
//! default is: the network stands for a cluster's hosts, not for this one.
//!
//! Addresses come from 198.18.0.0/15, the range set aside for benchmarks (RFC 2544). Everything is
//! made with iproute2's `ip` and `tc`, needs CAP_NET_ADMIN, and is removed when the
//! [`ShapedNetwork`] is dropped; namespaces left by a process that was killed are removed by the next
//! one. Processes enter a host's namespace through [`Host::namespace`] (`setns` before `exec`).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where `ip netns` keeps the namespaces it names.
const NETNS_DIR: &str = "/run/netns";
/// Every name this module makes starts so: `sy<pid in hex>n<count>`.
const PREFIX: &str = "sy";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "a shaped network needs CAP_NET_ADMIN to make network namespaces and links (run as root); `{command}` said: {said}"
    )]
    NotPermitted { command: String, said: String },
    #[error("a shaped network needs iproute2's `ip` and `tc`: {0}")]
    MissingTool(std::io::Error),
    #[error("`{command}` failed: {said}")]
    Command { command: String, said: String },
    #[error("no free /24 left in 198.18.0.0/15 for another shaped network")]
    NoSubnet,
    #[error(
        "TCP congestion control {name} is not available on this machine (it has: {available}); `{command}` said: {said}"
    )]
    CongestionUnavailable { name: CongestionControl, available: String, command: String, said: String },
}

/// A link rate in bits per second, as `tc` writes them: `1gbit`, `25gbit`, `500mbit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkRate {
    bits_per_second: u64,
}

impl LinkRate {
    pub fn from_bits_per_second(bits_per_second: u64) -> Self {
        Self { bits_per_second }
    }

    pub fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    pub fn bytes_per_second(self) -> f64 {
        self.bits_per_second as f64 / 8.0
    }

    /// The least time `bytes` take on this link.
    pub fn floor_seconds(self, bytes: f64) -> f64 {
        bytes / self.bytes_per_second()
    }

    /// The token bucket: 200 µs of the rate, at least two 64 KiB GSO segments. A larger bucket
    /// lets a whole small transfer (a decode step's few MB) pass above the rate; a smaller one
    /// throttles below it (raw TCP through 10 Gbit/s: 7.7 Gbit/s with 128 KiB, 9.0 with 5 MB).
    fn burst_bytes(self) -> u64 {
        (self.bits_per_second / 8 / 5000).max(128 * 1024)
    }
}

impl FromStr for LinkRate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let split = lower.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let scale = match unit {
            "gbit" | "g" | "gbps" => 1e9,
            "mbit" | "m" | "mbps" => 1e6,
            "kbit" | "k" | "kbps" => 1e3,
            _ => return Err(format!("{text:?}: expected a rate such as 1gbit, 10gbit, 25gbit or 500mbit")),
        };
        let value: f64 = number.parse().map_err(|_| format!("{text:?}: expected a number before {unit}"))?;
        let bits = value * scale;
        if !(1e5..=1e12).contains(&bits) {
            return Err(format!("{text:?}: a link rate from 100kbit to 1000gbit"));
        }
        Ok(Self { bits_per_second: bits as u64 })
    }
}

impl fmt::Display for LinkRate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_second;
        if bits.is_multiple_of(1_000_000_000) {
            write!(formatter, "{}gbit", bits / 1_000_000_000)
        } else if bits.is_multiple_of(1_000_000) {
            write!(formatter, "{}mbit", bits / 1_000_000)
        } else {
            write!(formatter, "{}kbit", bits / 1000)
        }
    }
}

/// As its text (`10gbit`), so that reports read as they are written.
impl serde::Serialize for LinkRate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for LinkRate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The TCP congestion control of a network's hosts towards each other.
///
/// CUBIC by default: the kernel's own default, what a cluster's hosts run unless tuned. This
/// project's 2-core machine runs BBR, whose paced sending (a timer per burst, starved while the
/// emulated hosts share two cores) left 10 Gbit/s links idle between bursts: DeepEP low-latency
/// with 2 workers reached 69-77% of the line rate in dispatch under BBR, 81-87% under CUBIC
/// (`switchyard bench --run deepep-low-latency --link-rate 10gbit`, alternated runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CongestionControl {
    #[default]
    Cubic,
    Bbr,
    Dctcp,
    Reno,
    /// Whatever this machine's default is (`net.ipv4.tcp_congestion_control`).
    Machine,
}

impl CongestionControl {
    /// The kernel's name of it; `None` for the machine's default.
    pub fn kernel_name(self) -> Option<&'static str> {
        match self {
            Self::Cubic => Some("cubic"),
            Self::Bbr => Some("bbr"),
            Self::Dctcp => Some("dctcp"),
            Self::Reno => Some("reno"),
            Self::Machine => None,
        }
    }
}

impl FromStr for CongestionControl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            "dctcp" => Ok(Self::Dctcp),
            "reno" => Ok(Self::Reno),
            "machine" => Ok(Self::Machine),
            _ => Err(format!("{text:?}: expected cubic, bbr, dctcp, reno or machine (this machine's default)")),
        }
    }
}

impl fmt::Display for CongestionControl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.kernel_name().unwrap_or("machine"))
    }
}

/// One host of the network: its namespace and address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace's file: a process enters it with `setns` (see `ChildProcess::spawn_in`).
    pub namespace: PathBuf,
    pub address: Ipv4Addr,
    /// Its link's rate in each direction; `None`: unshaped.
    pub rate: Option<LinkRate>,
}

impl Host {
    /// Moves the calling thread (only it) into this host's namespace: the sockets it opens from
    /// then on are the host's, e.g. a sink to measure raw TCP over the host's link.
    pub fn enter_on_this_thread(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let namespace = std::fs::File::open(&self.namespace)?;
        switchyard_common::children::enter_network_namespace(namespace.as_raw_fd())
    }
}

/// The namespaces, links and shapers of one network; all removed on drop.
#[derive(Debug)]
pub struct ShapedNetwork {
    tag: String,
    congestion: CongestionControl,
    subnet: [u8; 3],
    client_address: Ipv4Addr,
    hosts: Vec<Host>,
}

impl ShapedNetwork {
    /// The switch and the client's link; hosts come with [`ShapedNetwork::add_host`]; every host's
    /// TCP (this process's towards the network included) runs `congestion`. Blocking: it runs `ip`
    /// and `tc`.
    pub fn create(congestion: CongestionControl) -> Result<Self, NetworkError> {
        remove_stale();
        static NETWORKS: AtomicU32 = AtomicU32::new(0);
        let count = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{PREFIX}{:x}n{count}", std::process::id());
        let switch = format!("{tag}-switch");
        run(&["ip", "netns", "add", &switch])?;
        // From here the drop removes whatever was made, also when a later step fails.
        let mut network =
            Self { tag, congestion, subnet: [198, 18, 0], client_address: Ipv4Addr::UNSPECIFIED, hosts: Vec::new() };
        network.subnet = free_subnet(count)?;
        network.client_address = network.address_of(1);
        let client_link = network.client_link();
        let client_address = format!("{}/24", network.client_address);
        for command in [
            vec!["ip", "-n", &switch, "link", "set", "lo", "up"],
            vec!["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"],
            vec!["ip", "-n", &switch, "link", "set", "br0", "up"],
            vec!["ip", "link", "add", &client_link, "type", "veth", "peer", "name", "client", "netns", &switch],
            vec!["ip", "-n", &switch, "link", "set", "client", "master", "br0", "up"],
            vec!["ip", "addr", "add", &client_address, "dev", &client_link],
            vec!["ip", "link", "set", &client_link, "up"],
        ] {
            run(&command)?;
        }
        network.set_congestion(None, &client_link, network.client_address)?;
        Ok(network)
    }

    /// A new host `name` (short: it names its switch port) on the switch, its link shaped to `rate`
    /// each way when given.
    pub fn add_host(&mut self, name: &str, rate: Option<LinkRate>) -> Result<Host, NetworkError> {
        let host_number = self.hosts.len() + 2;
        if host_number > 254 {
            return Err(NetworkError::Command {
                command: format!("add host {name}"),
                said: "254 hosts at most".into(),
            });
        }
        let namespace = format!("{}-{name}", self.tag);
        let switch = self.switch();
        let address = self.address_of(host_number as u8);
        run(&["ip", "netns", "add", &namespace])?;
        let host = Host { name: name.to_owned(), namespace: PathBuf::from(NETNS_DIR).join(&namespace), address, rate };
        self.hosts.push(host.clone());
        let cidr = format!("{address}/24");
        for command in [
            vec!["ip", "-n", &namespace, "link", "set", "lo", "up"],
            vec!["ip", "-n", &switch, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", &namespace],
            vec!["ip", "-n", &switch, "link", "set", name, "master", "br0", "up"],
            vec!["ip", "-n", &namespace, "addr", "add", &cidr, "dev", "eth0"],
            vec!["ip", "-n", &namespace, "link", "set", "eth0", "up"],
        ] {
            run(&command)?;
        }
        self.set_congestion(Some(&namespace), "eth0", address)?;
        if let Some(rate) = rate {
            // Egress of each end: the host's side shapes what it sends, the switch's port what it gets.
            shape(&namespace, "eth0", rate)?;
            shape(&switch, name, rate)?;
        }
        Ok(host)
    }

    /// This process's address on the network: what the client's connections come from.
    pub fn client_address(&self) -> Ipv4Addr {
        self.client_address
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The namespaces this network made (for checks that they are gone after it).
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.switch())
            .chain(self.hosts.iter().map(|host| format!("{}-{}", self.tag, host.name)))
            .collect()
    }

    /// The link in this process's namespace (for checks that it is gone after the network).
    pub fn client_link(&self) -> String {
        format!("{}c", self.tag)
    }

    fn switch(&self) -> String {
        format!("{}-switch", self.tag)
    }

    /// The network's congestion control on the route to its subnet from `address` on `device` (in
    /// `namespace`; `None`: this process's): the route the kernel made for the address, with
    /// `congctl`. Connections opened and accepted over it take it.
    fn set_congestion(&self, namespace: Option<&str>, device: &str, address: Ipv4Addr) -> Result<(), NetworkError> {
        let Some(name) = self.congestion.kernel_name() else { return Ok(()) };
        let [a, b, c] = self.subnet;
        let (subnet, source) = (format!("{a}.{b}.{c}.0/24"), address.to_string());
        let mut command = vec!["ip"];
        command.extend(namespace.map(|namespace| ["-n", namespace]).into_iter().flatten());
        command.extend(["route", "replace", &subnet, "dev", device, "proto", "kernel", "scope", "link"]);
        command.extend(["src", &source, "congctl", name]);
        run(&command).map_err(|error| match error {
            // iproute2: "Error: Unknown tcp congestion algorithm."; any other failure is the route's.
            NetworkError::Command { command, said } if said.to_ascii_lowercase().contains("congestion") => {
                NetworkError::CongestionUnavailable {
                    name: self.congestion,
                    available: std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                        .map_or_else(|_| "unknown".to_owned(), |names| names.trim().to_owned()),
                    command,
                    said,
                }
            }
            other => other,
        })
    }

    fn address_of(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, host)
    }
}

impl Drop for ShapedNetwork {
    fn drop(&mut self) {
        // A namespace takes its links with it, and a veth pair goes with either end: deleting the
        // namespaces removes every link, the client's included.
        for namespace in self.namespaces().into_iter().rev() {
            let _ = run(&["ip", "netns", "del", &namespace]);
        }
        let _ = run(&["ip", "link", "del", &self.client_link()]);
    }
}

/// `tbf` on `device` in `namespace` at `rate`.
fn shape(namespace: &str, device: &str, rate: LinkRate) -> Result<(), NetworkError> {
    let (rate, burst) = (rate.bits_per_second().to_string() + "bit", rate.burst_bytes().to_string());
    run(&[
        "tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "50ms",
    ])
}

/// A /24 of 198.18.0.0/15 that no address of this namespace is in, looked for from a place of
/// this process's and this network's own (two networks made at once start apart).
fn free_subnet(network: u32) -> Result<[u8; 3], NetworkError> {
    let listed = output(&["ip", "-4", "-o", "addr", "show"])?;
    let start = std::process::id() as usize * 7 + network as usize * 37;
    first_free_subnet(&listed, start).ok_or(NetworkError::NoSubnet)
}

/// The first of 198.18.0.0/15's 512 /24s, counted from the `start`-th (modulo 512) and wrapping
/// around, that no address in `listed` (`ip -4 -o addr show`) is in.
fn first_free_subnet(listed: &str, start: usize) -> Option<[u8; 3]> {
    let taken = |third: [u8; 3]| listed.contains(&format!(" {}.{}.{}.", third[0], third[1], third[2]));
    (0..512)
        .map(|offset| (start + offset) % 512)
        .map(|index| [198, 18 + (index / 256) as u8, (index % 256) as u8])
        .find(|subnet| !taken(*subnet))
}

/// Removes the namespaces (and with them the links) of networks whose process is gone.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_of(&name) else { continue };
        if !PathBuf::from(format!("/proc/{owner}")).exists() {
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

/// The pid in a name this module made: `sy<pid in hex>n<count>-<host>`.
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (tag, _) = rest.split_once('-')?;
    let (pid, count) = tag.split_once('n')?;
    count.parse::<u32>().ok()?;
    u32::from_str_radix(pid, 16).ok()
}

fn output(command: &[&str]) -> Result<String, NetworkError> {
    let result = Command::new(command[0]).args(&command[1..]).output().map_err(NetworkError::MissingTool)?;
    let said = String::from_utf8_lossy(&result.stderr).trim().to_owned();
    if result.status.success() {
        return Ok(String::from_utf8_lossy(&result.stdout).into_owned());
    }
    let command = command.join(" ");
    if said.contains("Operation not permitted") || said.contains("Permission denied") {
        return Err(NetworkError::NotPermitted { command, said });
    }
    Err(NetworkError::Command { command, said })
}

fn run(command: &[&str]) -> Result<(), NetworkError> {
    output(command).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_tc_writes_them_and_refuse_the_rest_by_name() {
        let rate = |text: &str| text.parse::<LinkRate>().map(LinkRate::bits_per_second);
        assert_eq!(rate("1gbit"), Ok(1_000_000_000));
        assert_eq!(rate("25Gbit"), Ok(25_000_000_000));
        assert_eq!(rate("500mbit"), Ok(500_000_000));
        assert_eq!(rate("2.5gbit"), Ok(2_500_000_000));
        assert_eq!(rate("100kbit"), Ok(100_000));
        assert_eq!(rate("40M"), Ok(40_000_000));
        for bad in ["10", "fast", "10gbyte", "0gbit", "99kbit", "5000gbit"] {
            assert!(rate(bad).unwrap_err().contains(bad), "{bad}");
        }
        assert_eq!("10gbit".parse::<LinkRate>().map(|rate| rate.to_string()), Ok("10gbit".into()));
        assert_eq!("2.5gbit".parse::<LinkRate>().map(|rate| rate.to_string()), Ok("2500mbit".into()));
        let link = "25gbit".parse::<LinkRate>().expect("rate");
        assert!((link.floor_seconds(3.125e9) - 1.0).abs() < 1e-12, "25 Gbit/s moves 3.125 GB in a second");
        assert!((link.floor_seconds(1e6) - 320e-6).abs() < 1e-15, "and 1 MB in 320 µs");
    }

    #[test]
    fn the_token_bucket_holds_200_microseconds_of_the_rate_and_two_gso_segments_at_least() {
        let burst = |text: &str| text.parse::<LinkRate>().expect("rate").burst_bytes();
        assert_eq!(burst("10gbit"), 250_000);
        assert_eq!(burst("100gbit"), 2_500_000);
        assert_eq!(burst("1gbit"), 128 * 1024, "25 kB of the rate: the floor");
    }

    #[test]
    fn congestion_controls_parse_by_kernel_name_and_refuse_the_rest_by_name() {
        assert_eq!("cubic".parse(), Ok(CongestionControl::Cubic));
        assert_eq!(" BBR".parse(), Ok(CongestionControl::Bbr));
        assert_eq!("machine".parse::<CongestionControl>().map(CongestionControl::kernel_name), Ok(None));
        assert_eq!(CongestionControl::default().to_string(), "cubic");
        for name in ["cubic", "bbr", "dctcp", "reno", "machine"] {
            assert_eq!(name.parse::<CongestionControl>().map(|parsed| parsed.to_string()), Ok(name.to_owned()));
        }
        let refused = "vegas".parse::<CongestionControl>().unwrap_err();
        assert!(refused.contains("vegas") && refused.contains("cubic"), "{refused}");
    }

    #[test]
    fn a_subnet_is_one_no_address_here_is_in_counted_from_the_start_and_wrapping() {
        let listed = "1: lo    inet 127.0.0.1/8 scope host lo\n\
                      2: eth0    inet 198.18.1.4/24 brd 198.18.1.255 scope global eth0\n\
                      3: sy1c    inet 198.19.255.1/24 scope global sy1c\n";
        assert_eq!(first_free_subnet(listed, 0), Some([198, 18, 0]));
        assert_eq!(first_free_subnet(listed, 1), Some([198, 18, 2]), "198.18.1.0/24 is taken");
        assert_eq!(first_free_subnet(listed, 300), Some([198, 19, 44]));
        assert_eq!(first_free_subnet(listed, 511), Some([198, 18, 0]), "198.19.255.0/24 is taken: wraps around");
        assert_eq!(first_free_subnet(listed, 512 + 257), Some([198, 19, 1]), "the start counts modulo 512");
        let everything: String =
            (0..512).map(|index| format!("x: eth0 inet 198.{}.{}.1/24\n", 18 + index / 256, index % 256)).collect();
        assert_eq!(first_free_subnet(&everything, 42), None);
    }

    #[test]
    fn only_names_this_module_made_have_an_owner() {
        assert_eq!(owner_of("sy1f2an0-switch"), Some(0x1f2a));
        assert_eq!(owner_of("sy1f2an12-w3"), Some(0x1f2a));
        for foreign in ["cni-1234", "sy-switch", "synap-w0", "syabcn-w0", "myns"] {
            assert_eq!(owner_of(foreign), None, "{foreign}");
        }
    }
}
