//! What the ways to run vestibule (deploy/) depend on, proven here:
//! - the upstream as a service name: followed when its address moves, and a stalled name
//!   server never holds up requests on pooled connections;
//! - the compose topology's own configuration files (deploy/compose/), run natively: Redis, two
//!   instances, nginx as the load balancer and the demo shop, with visitors through it;
//! - the container image (deploy/Dockerfile) built with podman, its binary run from the
//!   mounted image;
//! - every deploy file passes its checker: kustomize and the Kubernetes schemas, the compose
//!   specification, `systemd-analyze verify` and `security`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vestibule::config::Config;
use vestibule::server;
use vestibule::token::{generate_key, KeyKind};

use common::dns::NameServer;
use common::{get, TempDir, DEADLINE};

/// An upstream that answers every request with its own name; with `close`, it closes each
/// connection after answering, so that every request through the proxy opens a new one.
struct Named {
    stop: CancellationToken,
}

impl Named {
    async fn start(addr: SocketAddr, name: &'static str, close: bool) -> Named {
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((stream, _)) => stream, Err(_) => continue },
                };
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from(name)));
                        if close {
                            response.headers_mut().insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let connection =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = connection => {}
                    }
                });
            }
        });
        Named { stop }
    }

    /// Stop listening and close every connection, as a pod that went away.
    fn stop(&self) {
        self.stop.cancel();
    }
}

/// A gate with no room in front of `http://shop.test:{port}`, asking `dns` for the name.
async fn gate_for_name(port: u16, dns: &NameServer, upstream_extra: &str) -> (server::Running, TempDir) {
    let dir = TempDir::new("dns");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n[upstream]\nurl = \"http://shop.test:{port}\"\n\
         nameservers = [\"{}\"]\n{upstream_extra}\n[tokens]\nsigning_key = {key:?}\n",
        dns.addr
    );
    let config = Config::parse(&text, "test.toml", dir.path()).unwrap();
    (server::start(&config).await.unwrap(), dir)
}

/// A free port on both 127.0.0.1 and 127.0.0.2 (two "pods" of one service).
async fn port_on_both() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test]
async fn an_upstream_name_is_followed_when_its_address_moves() {
    let port = port_on_both().await;
    let pod_a = Named::start(SocketAddr::from(([127, 0, 0, 1], port)), "pod a", true).await;
    let _pod_b = Named::start(SocketAddr::from(([127, 0, 0, 2], port)), "pod b", true).await;
    let dns = NameServer::start(Ipv4Addr::new(127, 0, 0, 1), 2).await;
    let (running, _dir) = gate_for_name(port, &dns, "").await;

    // Every request opens a new connection (the upstream closes each), and within the TTL the
    // answer kept is used: one question for many connections.
    for _ in 0..5 {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "pod a"));
    }
    assert_eq!(dns.answered(), 1, "connections within the TTL reuse the answer kept");

    // The name moves: once the TTL has run out, new connections go to the new address, and
    // nothing fails on the way.
    dns.set_address(Ipv4Addr::new(127, 0, 0, 2));
    let moved = Instant::now();
    loop {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "no request fails while the name moves: {body}");
        if body == "pod b" {
            break;
        }
        assert!(moved.elapsed() < Duration::from_secs(2) + DEADLINE / 2, "the new address was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved.elapsed() >= Duration::from_millis(500), "the answer was kept for its TTL, not asked each time");

    // A long TTL, and the pod behind it goes away: one failed connection makes the proxy ask
    // again at once rather than keep the dead address for the rest of the hour.
    dns.set_ttl(3600);
    dns.set_address(Ipv4Addr::new(127, 0, 0, 1));
    let deadline = Instant::now() + DEADLINE;
    while get(running.addr, "/", &[]).await.2 != "pod a" {
        assert!(Instant::now() < deadline, "the name never came back to pod a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dns.set_address(Ipv4Addr::new(127, 0, 0, 2));
    pod_a.stop();
    let mut failed = 0;
    loop {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        if body == "pod b" {
            break;
        }
        assert_eq!(status, StatusCode::BAD_GATEWAY, "a dead address is a 502: {body}");
        failed += 1;
        assert!(failed <= 1, "after a failed connection the name is asked again, not kept for its TTL");
    }
    running.shutdown();
}

#[tokio::test]
async fn a_stalled_name_server_does_not_hold_up_requests_on_pooled_connections() {
    let port = port_on_both().await;
    let _pod = Named::start(SocketAddr::from(([127, 0, 0, 1], port)), "pod a", false).await;
    // TTL 0: nothing is kept, so any request that needed the name would ask for it.
    let dns = NameServer::start(Ipv4Addr::new(127, 0, 0, 1), 0).await;
    // A long connect timeout: a request that waited for the stalled server would wait 30 s.
    let (running, _dir) = gate_for_name(port, &dns, "connect_timeout = \"30s\"").await;
    let fetch = || async {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        (status, body)
    };
    assert_eq!(fetch().await, (StatusCode::OK, "pod a".to_owned()));

    dns.stall();
    let started = Instant::now();
    for _ in 0..200 {
        assert_eq!(fetch().await, (StatusCode::OK, "pod a".to_owned()));
    }
    assert_eq!(dns.unanswered(), 0, "requests on the pooled connection asked for no name");
    assert!(started.elapsed() < Duration::from_secs(5), "200 requests took {:?}", started.elapsed());
    running.shutdown();
}

/// A tool the deploy tests need: tests/run installs each (apt, or the Python tools into
/// target/deploy-tools); missing, the test fails and says so rather than skip.
fn tool(name: &str) -> PathBuf {
    let local = repo("target/deploy-tools/bin").join(name);
    let system = ["/usr/sbin", "/sbin"].iter().map(|dir| Path::new(dir).join(name)).find(|path| path.exists());
    [Some(local).filter(|path| path.exists()), which(name), system]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or_else(|| panic!("the deploy tests need `{name}`: run them with `bash tests/run`, which installs it"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Run a command to completion; panic with its output if it fails.
fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_kubernetes_manifests_build_with_kustomize_and_pass_their_schemas() {
    let dir = TempDir::new("kustomize");
    let base = dir.path().join("kubernetes");
    run(Command::new("cp").arg("-r").arg(repo("deploy/kubernetes")).arg(&base));
    // What the operator makes before the first apply (deploy/README.md).
    std::fs::write(base.join("secrets/ed25519.pem"), generate_key(KeyKind::Eddsa)).unwrap();
    std::fs::write(base.join("secrets/admin-token"), "a-token-of-the-operators-own").unwrap();
    let built = match which("kustomize") {
        Some(kustomize) => run(Command::new(kustomize).arg("build").arg(&base)),
        None => run(Command::new(tool("kubectl")).arg("kustomize").arg(&base)),
    };
    let manifests = dir.path().join("built.yaml");
    std::fs::write(&manifests, &built).unwrap();
    let report = run(Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.30.0"]).arg(&manifests));
    for kind in ["configmap", "secret", "deployment/vestibule", "service/vestibule", "poddisruptionbudget/vestibule"] {
        assert!(report.contains(&format!("passed for resource {kind}")), "{kind} was not validated:\n{report}");
    }
    assert!(!report.contains("WARN"), "{report}");

    // What the Deployment promises: probes on the admin port, a grace period above the drain
    // plus the preStop pause, non-root with a read-only root, both files mounted.
    for needle in [
        "path: /readyz",
        "path: /healthz",
        "terminationGracePeriodSeconds: 45",
        "seconds: 5",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "replicas: 2",
        "minAvailable: 1",
        "mountPath: /etc/vestibule/config",
        "mountPath: /etc/vestibule/keys",
    ] {
        assert!(built.contains(needle), "the manifests lack {needle:?}");
    }
    // The ConfigMap's proxy.toml is a valid configuration for those mounts, with a drain
    // shorter than the grace period less the pause.
    let text = std::fs::read_to_string(base.join("proxy.toml")).unwrap();
    let key = base.join("secrets/ed25519.pem");
    let text = text.replace("/etc/vestibule/keys/ed25519.pem", key.to_str().unwrap());
    std::env::set_var("VESTIBULE_ADMIN_TOKEN", "a-token-of-the-operators-own");
    let config = Config::parse(&text, "deploy/kubernetes/proxy.toml", &base).unwrap();
    vestibule::token::Tokens::new(&config.tokens).unwrap();
    assert!(config.server.shutdown_grace + Duration::from_secs(5) < Duration::from_secs(45));
    // Nothing is trusted to name clients by default: any pod could claim any address.
    assert!(config.server.trusted_proxies.is_empty(), "{:?}", config.server.trusted_proxies);
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let compose = repo("deploy/compose.yaml");
    run(Command::new(tool("check-jsonschema")).args(["--builtin-schema", "vendor.compose-spec"]).arg(&compose));
    let text = std::fs::read_to_string(&compose).unwrap();
    for file in ["compose/proxy.toml", "compose/nginx.conf", "compose/prometheus.yml", "compose/alerts.yml"] {
        assert!(text.contains(&format!("./{file}")), "compose.yaml mounts {file}");
        assert!(repo("deploy").join(file).exists(), "deploy/{file} exists");
    }
}

/// The alert on the store: valid rules, firing for the instance that lost its store after
/// 10 s and resolving when it is back (promtool's own rule tests).
#[test]
fn the_alerting_rules_check_and_fire_when_the_store_is_away() {
    let promtool = tool("promtool");
    run(Command::new(&promtool).args(["check", "rules"]).arg(repo("deploy/compose/alerts.yml")));
    let compose = std::fs::read_to_string(repo("deploy/compose/prometheus.yml")).unwrap();
    assert!(compose.contains("/etc/prometheus/alerts.yml"), "the compose Prometheus loads the rules");
    let said = run(Command::new(&promtool).args(["test", "rules"]).arg(repo("deploy/compose/alerts.test.yml")));
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let dir = TempDir::new("systemd");
    let unit = dir.path().join("vestibule.service");
    // The unit names /usr/local/bin/vestibule; verify checks that it exists, so point it at
    // the binary under test.
    let text = std::fs::read_to_string(repo("deploy/systemd/vestibule.service")).unwrap();
    assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"), "reload is SIGHUP");
    std::fs::write(&unit, text.replace("/usr/local/bin/vestibule", env!("CARGO_BIN_EXE_vestibule"))).unwrap();
    let analyze = tool("systemd-analyze");
    let output = Command::new(&analyze).arg("verify").arg(&unit).output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
    // systemd's own exposure score (0 to 10; 1.4 today, "OK"): fail above 2.
    run(Command::new(&analyze).args(["security", "--offline=yes", "--threshold=20"]).arg(&unit));
}

/// `name` on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var("PATH").ok()?.split(':').map(|dir| Path::new(dir).join(name)).find(|path| path.exists())
}

/// The JSON log line of a spawned vestibule that says `message`, and its `addr`.
fn address_logged(lines: &mut impl Iterator<Item = std::io::Result<String>>, message: &str) -> SocketAddr {
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("vestibule exited before logging {message:?}")).unwrap();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if event["message"] == message {
            return event["addr"].as_str().unwrap().parse().unwrap();
        }
    }
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_image_builds_with_podman_and_its_binary_serves_from_the_mounted_image() {
    use std::io::{BufRead, BufReader};
    assert!(
        rustix::process::geteuid().is_root(),
        "the image test mounts an image and chroots into it: run it as root (bash tests/run in CI does)"
    );
    let podman = tool("podman");
    let dir = TempDir::new("image");
    let context = dir.path();
    let rootfs = context.join("rootfs");

    // The build stage's output, made here (no Rust image can be pulled offline): the binary
    // under /out as the Dockerfile's build stage leaves it, without its debug information, and
    // the libraries it links at their own paths.
    let binary = env!("CARGO_BIN_EXE_vestibule");
    std::fs::create_dir_all(rootfs.join("out/usr/local/bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("out/var/lib/vestibule")).unwrap();
    std::fs::write(rootfs.join("out/var/lib/vestibule/.keep"), "").unwrap();
    run(Command::new("objcopy").arg("--strip-debug").arg(binary).arg(rootfs.join("out/usr/local/bin/vestibule")));
    for library in run(Command::new("ldd").arg(binary)).split_whitespace().filter(|word| word.starts_with('/')) {
        let target = rootfs.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(library, &target).unwrap();
    }
    // What an operator mounts: a signing key beside the shipped proxy.toml, and a test
    // configuration of its own on free ports.
    std::fs::create_dir_all(rootfs.join("etc/vestibule/keys")).unwrap();
    std::fs::write(rootfs.join("etc/vestibule/keys/ed25519.pem"), generate_key(KeyKind::Eddsa)).unwrap();
    std::fs::write(
        rootfs.join("etc/vestibule/test.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"a-test-admin-token\"\n\
         [upstream]\nurl = \"http://127.0.0.1:9\"\n[tokens]\nsigning_key = \"keys/ed25519.pem\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    // The shipped file with the one change an operator must make: an admin token of their own.
    let shipped = std::fs::read_to_string(repo("proxy.toml")).unwrap();
    std::fs::write(context.join("proxy.toml"), shipped.replace("change-me-please", "an-operators-own-secret")).unwrap();

    let tag = format!("localhost/vestibule-test:{}", std::process::id());
    run(Command::new(&podman)
        .args(["build", "--format", "docker", "--build-arg", "BINARY=prebuilt", "--build-arg", "RUNTIME=prebuilt"])
        .args(["-t", &tag, "-f"])
        .arg(repo("deploy/Dockerfile"))
        .arg(context));
    struct Image(PathBuf, String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).args(["image", "unmount", &self.1]).output();
            let _ = Command::new(&self.0).args(["rmi", "-f", &self.1]).output();
        }
    }
    let _image = Image(podman.clone(), tag.clone());

    let inspect = run(Command::new(&podman).args(["image", "inspect", &tag]));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "a non-root user");
    assert!(config["ExposedPorts"].get("8080/tcp").is_some() && config["ExposedPorts"].get("9090/tcp").is_some());
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/vestibule"]));
    assert_eq!(config["Cmd"], serde_json::json!(["run", "--config", "/etc/vestibule/proxy.toml"]));
    let health: Vec<String> =
        serde_json::from_value(inspect[0]["Healthcheck"]["Test"].clone()).expect("the image has a health check");
    assert_eq!(health[..3], ["CMD", "/usr/local/bin/vestibule", "probe"]);

    let mount = PathBuf::from(run(Command::new(&podman).args(["image", "mount", &tag])).trim());
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(mount.join("var/lib/vestibule")).unwrap();
    assert_eq!((own.uid(), own.gid()), (65532, 65532), "the image's user owns its folder");

    // As the image's user, inside the image: the shipped configuration checks out, and the
    // binary serves and answers its own health check.
    let inside = |args: &[&str]| {
        let mut command = Command::new("chroot");
        command.arg("--userspec=65532:65532").arg(&mount).args(args);
        command
    };
    let said = run(&mut inside(&["/usr/local/bin/vestibule", "check", "--config", "/etc/vestibule/proxy.toml"]));
    assert!(said.contains("ok"), "{said}");
    let mut serving = inside(&["/usr/local/bin/vestibule", "run", "--config", "/etc/vestibule/test.toml"]);
    let mut child = Child(serving.stdout(Stdio::piped()).spawn().unwrap());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let admin = address_logged(&mut lines, "admin listening");
    std::thread::spawn(move || lines.for_each(drop));
    let probe = format!("http://{admin}/healthz");
    let mut health_check: Vec<&str> = health[1..].iter().map(String::as_str).collect();
    *health_check.last_mut().unwrap() = &probe;
    let said = run(&mut inside(&health_check));
    assert!(said.contains("200"), "{said}");
    // And the probe fails when nothing answers.
    drop(child);
    assert!(
        !inside(&health_check).output().unwrap().status.success(),
        "the health check fails once the server is gone"
    );
}

/// `text` with each `(from, to)` replaced; each `from` must be there, so that the test follows
/// the deploy files rather than drift from them.
fn replaced(text: &str, replacements: &[(&str, String)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in replacements {
        assert!(text.contains(from), "the deploy file no longer says {from:?}");
        text = text.replace(from, to);
    }
    text
}

async fn admin_call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        // As Prometheus asks for it on the compose network (admin.hosts).
        .header("host", "vestibule-a:9090")
        .header("authorization", "Bearer compose-admin-token")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, _, body) = common::send(admin, request).await;
    (status, body)
}

/// `vestibule_requests_total{room="checkout",outcome}` at one instance.
async fn requests_at(admin: SocketAddr, outcome: &str) -> f64 {
    let (_, text) = admin_call(admin, "GET", "/metrics", "").await;
    let wanted = format!("vestibule_requests_total{{room=\"checkout\",outcome=\"{outcome}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&wanted)).map_or(0.0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_runs_natively_and_serves_visitors_through_the_load_balancer() {
    let nginx = tool("nginx");
    let redis = common::redis_server::RedisServer::start();
    let dir = TempDir::new("compose");
    let binary = env!("CARGO_BIN_EXE_vestibule");
    // The `keys` service: one key both instances share.
    let key = dir.path().join("ed25519.pem");
    run(Command::new(binary).args(["keygen", "--out"]).arg(&key));

    let shop = free_port();
    let _shop = Child(
        Command::new(binary)
            .args(["shop", "--listen", &format!("127.0.0.1:{shop}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let compose_config = std::fs::read_to_string(repo("deploy/compose/proxy.toml")).unwrap();
    let mut instances = Vec::new();
    let mut children = Vec::new();
    for name in ["a", "b"] {
        let (listen, admin) = (free_port(), free_port());
        let text = replaced(
            &compose_config,
            &[
                ("\"0.0.0.0:8080\"", format!("\"127.0.0.1:{listen}\"")),
                ("\"0.0.0.0:9090\"", format!("\"127.0.0.1:{admin}\"")),
                ("http://shop:3000", format!("http://127.0.0.1:{shop}")),
                ("redis://redis:6379/0", format!("redis://127.0.0.1:{}/0", redis.port)),
                ("\"172.28.0.10\"", "\"127.0.0.1\"".to_owned()),
                ("\"/var/lib/vestibule/ed25519.pem\"", format!("{key:?}")),
            ],
        );
        let path = dir.path().join(format!("proxy-{name}.toml"));
        std::fs::write(&path, text).unwrap();
        children.push(Child(
            Command::new(binary)
                .args(["run", "--config"])
                .arg(&path)
                .env("VESTIBULE_ADMIN_TOKEN", "compose-admin-token")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        instances.push((SocketAddr::from(([127, 0, 0, 1], listen)), SocketAddr::from(([127, 0, 0, 1], admin))));
    }
    // The compose file starts the load balancer once both instances are healthy.
    for &(_, admin) in &instances {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = tokio::net::TcpStream::connect(admin).await.is_ok()
                && admin_call(admin, "GET", "/readyz", "").await.0 == StatusCode::OK;
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "instance at {admin} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let lb = free_port();
    let nginx_config = replaced(
        &std::fs::read_to_string(repo("deploy/compose/nginx.conf")).unwrap(),
        &[
            ("vestibule-a:8080", instances[0].0.to_string()),
            ("vestibule-b:8080", instances[1].0.to_string()),
            ("listen 8080;", format!("listen 127.0.0.1:{lb};")),
            ("/tmp/", format!("{}/", dir.path().display())),
        ],
    );
    let nginx_conf = dir.path().join("nginx.conf");
    std::fs::write(&nginx_conf, nginx_config).unwrap();
    let _nginx = Child(
        Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&nginx_conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .unwrap(),
    );
    let front = SocketAddr::from(([127, 0, 0, 1], lb));
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(front).await.is_err() {
        assert!(Instant::now() < deadline, "nginx never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A visitor through the load balancer: admitted at once into the idle room, then served
    // by both instances in turn (round robin, no stickiness: one line in Redis).
    let mut first = common::visitor::Visitor::new(front);
    let (status, _, page) = first.open("/checkout").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Checkout"), "the shop's checkout page: {page}");
    for _ in 0..6 {
        let (status, _, page) = first.open("/checkout").await;
        assert!(status == StatusCode::OK && page.contains("Checkout"), "{status} {page}");
    }
    for &(_, admin) in &instances {
        let served = requests_at(admin, "admitted").await + requests_at(admin, "entered").await;
        assert!(served >= 1.0, "the instance with admin {admin} served the visitor");
    }

    // The operator pauses the room at one instance; a newcomer through the load balancer
    // waits at both; opened again at the other instance, the newcomer is let in.
    let (status, body) = admin_call(instances[0].1, "PATCH", "/rooms/checkout", r#"{"state":"paused"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut second = common::visitor::Visitor::new(front);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, _, page) = second.open("/checkout").await;
        if status != StatusCode::OK || !page.contains("Checkout") {
            break;
        }
        // The change reaches the other instance within a second.
        assert!(Instant::now() < deadline, "the pause never held the newcomer");
        second = common::visitor::Visitor::new(front);
    }
    for _ in 0..2 {
        assert_eq!(second.status().await["status"], "paused", "both instances hold the newcomer");
    }
    let (status, body) = admin_call(instances[1].1, "PATCH", "/rooms/checkout", r#"{"state":"open"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    second.wait_for_status("admitted").await;
    let (status, _, page) = second.open("/checkout").await;
    assert!(status == StatusCode::OK && page.contains("Checkout"), "{status} {page}");
    drop(children);
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_one_and_a_configuration_beyond_it_is_reported() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("nofile");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let config = dir.path().join("proxy.toml");
    // More waiting sockets than any limit this machine gives a process.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_feed_sockets = 100000000\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\
             [tokens]\nsigning_key = {key:?}\n[log]\nformat = \"json\"\n"
        ),
    )
    .unwrap();
    // Started with a low soft limit, as many service managers start a process.
    let mut child = Child(
        Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -Sn 256 && exec {} run --config {config:?}", env!("CARGO_BIN_EXE_vestibule")))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut warned = false;
    loop {
        let line = lines.next().expect("vestibule logs until it listens").unwrap();
        warned |= line.contains("exceed the open-file limit");
        if line.contains("\"listening\"") {
            break;
        }
    }
    assert!(warned, "a configuration that cannot fit in the open-file limit is reported");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let open_files = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "the soft limit was raised to the hard one: {open_files}");
    assert_ne!(numbers[0], "256");
}
