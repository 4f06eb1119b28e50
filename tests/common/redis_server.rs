//! A `redis-server` of the test's own, on a free loopback port, killed on drop. Tests never
//! touch a Redis they did not start; they may pause, kill and restart their own. It keeps
//! nothing on disk, so a restart comes back empty.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// A free port below the kernel's ephemeral range (32768 and up here), so that while a test's
/// Redis is killed nothing else takes its port: no `bind` to port 0 and no outgoing
/// connection's source port can land there, and a restart finds it free (a port from the
/// ephemeral range could go to another test's server meanwhile, which would answer for it).
fn quiet_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = quiet_port();
        let dir = TempDir::new("redis");
        let child = Self::spawn(port, &dir);
        let server = RedisServer { child, port, _dir: dir };
        server.wait_until_ready();
        server
    }

    fn spawn(port: u16, dir: &TempDir) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "the Redis tests need `redis-server` on the PATH (Redis 7: apt-get install redis-server): {error}"
                )
            })
    }

    /// Freeze the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} redis-server");
    }

    /// Kill the server (SIGKILL); it is down until [`restart`](Self::restart).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start a killed server again on the same port: empty.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, &self._dir);
        self.wait_until_ready();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of the test's own on loopback: three masters, each with one replica,
/// built with `redis-cli --cluster create`. Killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let port = free_cluster_port();
                let dir = TempDir::new("redis-cluster");
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                    // Replicas sync at once, so that one can take over a master soon after start.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--cluster-config-file")
                    .arg(dir.path().join("nodes.conf"))
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("the cluster tests need `redis-server` on the PATH (Redis 7)");
                let node = RedisServer { child, port, _dir: dir };
                node.wait_until_ready();
                node
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("the cluster tests need `redis-cli` on the PATH (Redis 7)");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `redis-cli` against the node on `port`.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Wait until every live node reports the cluster healthy and its slots covered, and
    /// every live replica is in sync with its master (else it could not take over).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live = self.nodes.iter().filter(|node| TcpStream::connect(("127.0.0.1", node.port)).is_ok());
            let ok = live.clone().count() > 0
                && live.into_iter().all(|node| {
                    let replication = Self::cli(node.port, &["info", "replication"]);
                    let synced = replication.contains("role:master") || replication.contains("master_link_status:up");
                    synced && Self::cli(node.port, &["cluster", "info"]).contains("cluster_state:ok")
                });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the master serving `key` now, if one does (none while a failover runs).
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let live = self.nodes.iter().find(|node| TcpStream::connect(("127.0.0.1", node.port)).is_ok()).unwrap();
        let slot: u16 = Self::cli(live.port, &["cluster", "keyslot", key]).trim().parse().unwrap();
        let nodes = Self::cli(live.port, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(2).is_some_and(|flags| flags.contains("master")) || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((low, high)) => (low.parse().unwrap_or(u16::MAX)..=high.parse().unwrap_or(0)).contains(&slot),
                None => range.parse() == Ok(slot),
            });
            if serves {
                let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return self.nodes.iter().position(|node| node.port == port);
            }
        }
        None
    }
}
